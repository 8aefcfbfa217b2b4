"""Skip-gram with negative sampling over two sharded tables, as block matrix products.

The input (center) and output (context) vectors are two `ShardedEmbedding` tables with the
same placement and a fused optimizer each. A step takes a stretch of consecutive centers and
looks each table up once: the centers in the input table; the stretch with ``window`` tokens
of context on each side, plus the negatives, in the output table. Looking up tokens rather
than (center, context) pairs moves about 2 x the average window (~6) times fewer rows.

Centers are cut into blocks of ``block`` consecutive tokens. For block ``j`` one batched
matrix product scores its centers against every position that can be their context (the
block plus ``window`` on each side) and another against ``shared_negatives`` negatives drawn
for the block. A mask keeps exactly word2vec's pairs: distance 1..reach of the center (its
random window this epoch), same sentence. Each center's negative terms are weighted by
``negatives * its pairs / shared_negatives``, so a center sees the expected negative gradient
of word2vec's ``negatives`` per pair, from draws shared within the block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..embedding import ShardedEmbedding


class SkipGram(nn.Module):
    def __init__(self, vocab_size: int, dim: int, *, page_size: int, placement, fused_optimizer: dict,
                 window: int, negatives: int, shared_negatives: int, block: int = 32, comm_dtype=None,
                 seed: int = 0, transport: str = "auto"):
        super().__init__()
        common = dict(page_size=page_size, placement=placement, fused_optimizer=fused_optimizer, comm_dtype=comm_dtype,
                      transport=transport)
        self.inputs = ShardedEmbedding(vocab_size, dim, seed=seed, **common)
        self.outputs = ShardedEmbedding(vocab_size, dim, seed=seed + 1, init="zeros", **common)
        with torch.no_grad():  # word2vec's start: inputs uniform(+-0.5/dim) (here its std), outputs 0
            self.inputs.weight.mul_(0.5 / dim / math.sqrt(3))
        self.window, self.negatives, self.shared, self.block = window, negatives, shared_negatives, block
        # Distance from each center of a block to each of its candidate context positions.
        span = block + 2 * window
        offset = torch.arange(span).view(1, span) - window - torch.arange(block).view(block, 1)
        self.register_buffer("_offset", offset.to(self.inputs.device), persistent=False)

    def _window_index(self, blocks: int) -> torch.Tensor:
        span = self.block + 2 * self.window
        return (torch.arange(blocks).view(blocks, 1) * self.block + torch.arange(span)).to(self._offset.device)

    @property
    def initial_loss_per_pair(self) -> float:
        """The loss per pair at the start: the output table is zero, so every score is 0 and
        each of a pair's 1 + ``negatives`` terms is log 2."""
        return (1 + self.negatives) * math.log(2)

    def set_learning_rate(self, lr: float) -> None:
        self.inputs.optimizer.lr = lr
        self.outputs.optimizer.lr = lr

    def num_blocks(self, centers: int) -> int:
        return math.ceil(centers / self.block)

    def loss(self, batch, negatives: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed negative-sampling loss, number of pairs) of a `corpus.Batch`;
        ``negatives`` is ``[blocks, shared_negatives]`` word ids.

        Collective: one lookup per table; the backward updates both tables.
        """
        w, s, dim, device = self.window, self.block, self.inputs.embedding_dim, self.inputs.device
        n = batch.num_centers
        blocks = self.num_blocks(n)
        pad = blocks * s - n  # the last block's missing centers: masked out
        tokens = F.pad(batch.tokens, (0, pad)).to(device)
        sentence = F.pad(batch.sentence, (0, pad), value=-1).to(device)
        reach = F.pad(batch.reach, (0, pad)).to(device)
        negatives = negatives.to(device)
        u = F.pad(self.inputs(tokens[w : w + n]), (0, 0, 0, pad)).view(blocks, s, dim)
        v = self.outputs(torch.cat([tokens, negatives.reshape(-1)]))
        v_seq, v_neg = v.split([tokens.numel(), negatives.numel()])
        span = s + 2 * w
        # Block j's candidate contexts are positions [j*s, j*s + span) of the padded stretch;
        # gathered with F.embedding, whose backward is a fast index_add (unfold's is not).
        windows = F.embedding(self._window_index(blocks), v_seq)  # [blocks, span, dim]
        scores = torch.bmm(u, windows.transpose(1, 2))  # [blocks, s, span]
        neg_scores = torch.bmm(u, v_neg.view(blocks, self.shared, dim).transpose(1, 2))  # [blocks, s, shared]

        center_sentence = sentence[w : w + blocks * s].view(blocks, s, 1)
        context_sentence = sentence.unfold(0, span, s) if blocks else sentence.new_empty(0, span)
        distance = self._offset.abs()
        pairs = ((distance >= 1) & (distance <= reach.view(blocks, s, 1)) & (center_sentence >= 0)
                 & (context_sentence.view(blocks, 1, span) == center_sentence))
        pairs = pairs.to(u.dtype)
        per_center = pairs.sum(-1, keepdim=True)  # word2vec pairs of each center
        loss = (F.softplus(-scores) * pairs).sum()
        loss = loss + (F.softplus(neg_scores) * (per_center * (self.negatives / self.shared))).sum()
        return loss, int(per_center.sum())
