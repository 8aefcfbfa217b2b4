"""What the exchanges moved: ids looked up, unique ids sent to each rank, bytes on the wire.

Counted on the host from split sizes the exchange knows anyway (no extra sync, no
collective), so ``emb.stats()`` is free to call. Comparing ranks' figures shows load
imbalance: a rank that serves far more rows than the others is the hot spot.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ExchangeStats:
    world: int
    calls: int = 0
    backward_calls: int = 0
    ids: int = 0
    unique_ids: int = 0
    local_ids: int = 0
    requested_per_rank: list[int] = field(default_factory=list)
    served_per_rank: list[int] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    exchanges: int = 0  # all-to-alls: requests (2 when one outgrew the capacity), vectors, gradients
    request_overflows: int = 0  # calls whose requests outgrew the capacity (a second request exchange)
    mirror_rows_reduced: int = 0

    def __post_init__(self):
        self.requested_per_rank = [0] * self.world
        self.served_per_rank = [0] * self.world

    def record_forward(self, num_ids: int, routing, row_bytes: int) -> None:
        """Requests (headers and rows) + vectors of one lookup call."""
        self.calls += 1
        self.ids += num_ids
        self.unique_ids += routing.num_unique
        self.local_ids += routing.num_self
        for r, (a, b) in enumerate(zip(routing.requested_counts, routing.served_counts)):
            self.requested_per_rank[r] += a
            self.served_per_rank[r] += b
        self.bytes_sent += routing.ints_sent * 8 + routing.num_served * row_bytes
        self.bytes_received += routing.ints_received * 8 + routing.num_remote * row_bytes
        self.exchanges += routing.request_exchanges + (self.world > 1)  # (+ the vectors)
        self.request_overflows += routing.request_exchanges > 1

    def record_backward(self, routing, row_bytes: int) -> None:
        self.backward_calls += 1
        self.exchanges += self.world > 1
        self.bytes_sent += routing.num_remote * row_bytes
        self.bytes_received += routing.num_served * row_bytes

    def as_dict(self) -> dict:
        calls = max(self.calls, 1)
        return {
            "calls": self.calls,
            "backward_calls": self.backward_calls,
            "ids": self.ids,
            "unique_ids": self.unique_ids,
            "local_unique_ids": self.local_ids,
            "unique_ids_sent_per_rank": list(self.requested_per_rank),
            "rows_served_per_rank": list(self.served_per_rank),
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "bytes_sent_per_call": self.bytes_sent / calls,
            "bytes_received_per_call": self.bytes_received / calls,
            "exchanges": self.exchanges,
            "request_overflows": self.request_overflows,
            "mirror_rows_reduced": self.mirror_rows_reduced,
        }
