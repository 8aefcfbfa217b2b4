"""LargeEmbedding: the 2017 API and its README examples, now over ranks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sharded_embedding import LargeEmbedding, initial_rows
from tests.harness import run_ranks
from tests.oracle import rank_world

X = torch.LongTensor([[0, 1, 10000, 30100], [10000, 1, 30100, 0]])


def _readme_example():
    """The original README: 50000 x 4 in pages of 10000 over 2 devices (here: ranks)."""
    rank, _ = rank_world()
    embedding = LargeEmbedding(n_words=50000, dim_word=4, page_size=10000, num_devices=2, use_cuda=False)
    y = embedding(X)
    assert y.shape == (2, 4, 4)
    table = initial_rows(0, 4, 0, 50000)
    assert torch.equal(y, table[X])
    assert embedding.num_pages == 5 and embedding.page_devices == [0, 1, 0, 1, 0]
    # "the result above should be an arrangement of the following three tensors":
    if rank == 0:
        assert torch.equal(embedding.embeddings[0](torch.LongTensor([0, 1])), y[0, :2])
        with pytest.raises(LookupError, match="page 1 is held by ranks"):
            embedding.embeddings[1](torch.LongTensor([0]))
    else:
        assert torch.equal(embedding.embeddings[1](torch.LongTensor([0])), y[0, 2:3])   # word 10000
        assert torch.equal(embedding.embeddings[3](torch.LongTensor([100])), y[0, 3:4])  # word 30100
    # It trains: CPU mode gives sparse gradients, as the original did.
    y.sum().backward()
    opt = torch.optim.SGD(embedding.parameters(), lr=1.0)
    assert embedding.table.weight.grad.is_sparse
    opt.step()
    return [int(v) for v in X.flatten()]


def test_readme_example_on_two_ranks():
    run_ranks(2, _readme_example)


def _device_list_example(device_list, page_size):
    rank, world = rank_world()
    embedding = LargeEmbedding(n_words=50000, dim_word=4, page_size=page_size, num_devices=2, use_cuda=False,
                               device_list=device_list)
    y = embedding(X)
    table = initial_rows(0, 4, 0, 50000)
    assert torch.equal(y, table[X])
    assert embedding.page_devices == [e[0] if isinstance(e, tuple) else e for e in device_list]
    y.sum().backward()
    torch.optim.SGD(embedding.parameters(), lr=0.5).step()
    # Every rank looked up X once: each looked-up row moved by 0.5 * world * its count in X.
    counts = torch.bincount(X.flatten(), minlength=50000).float()
    want = table - 0.5 * world * counts[:, None]
    assert torch.allclose(embedding.table.full_table(), want)


def test_readme_device_list_example_with_mirrors_on_seven_ranks():
    # Page 0 mirrored on 0 and 1, page 1 on 0 and 3, pages 2-4 on ranks 4, 5, 6.
    run_ranks(7, _device_list_example, [(0, 1), (0, 3), 4, 5, 6], 10000)


def test_readme_single_page_mirrored_on_four_ranks():
    run_ranks(4, _device_list_example, [(0, 1, 2, 3)], 50000)


def test_plain_script_without_torchrun(tmp_path):
    """Outside torchrun, LargeEmbedding makes a one-process group by itself."""
    script = tmp_path / "plain.py"
    script.write_text(
        "import torch\n"
        "from sharded_embedding import LargeEmbedding, finish\n"
        "e = LargeEmbedding(100, 3, page_size=30, num_devices=1, use_cuda=False)\n"
        "y = e(torch.tensor([[0, 99], [31, 5]]))\n"
        "y.sum().backward()\n"
        "print(tuple(y.shape), e.num_pages, e.page_devices)\n"
        "finish()\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 2, 3) 4 [0, 0, 0, 0]"


def test_a_page_list_given_in_use_cuda_s_place_is_named():
    """LargeEmbedding(50000, 4, 10000, 2, [(0, 1), 0, 1, 0, 1]): the list landed in use_cuda,
    and the error blamed CUDA ("use_cuda=True but CUDA is not available"). Now it names the
    signature, before anything (the process group included) is set up."""
    with pytest.raises(TypeError, match=r"use_cuda must be a bool or None, got list .*pass a page list as device_list="):
        LargeEmbedding(50000, 4, 10000, 2, [(0, 1), 0, 1, 0, 1])
