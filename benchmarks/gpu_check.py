"""The short GPU check: the CUDA/nccl path of ShardedEmbedding on one rank, then a step timing.

    torchrun --standalone --nproc_per_node=1 benchmarks/gpu_check.py            # cuda + nccl
    torchrun --standalone --nproc_per_node=1 benchmarks/gpu_check.py --device cpu   # same checks, gloo

1. Correctness on the device: a table with every fused optimizer and with sparse gradients,
   ids given on the CPU and on the device, outputs and updates against nn.Embedding (+ the
   matching torch.optim optimizer) on the same device; int32 ids; bf16 communication.
2. Timing (CUDA events, after warm-up): a training step at S (1M x 64, 16384 ids) and M
   (10M x 128, 32768 ids) for ours (fused SGD) and nn.Embedding(sparse=True) + SGD on the
   same ids; median ms and the ratio. With one rank there is no exchange: this measures the
   device path itself (dedup sort, gathers, embedding_bag, the fused update).
Prints one JSON line (rank 0) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from sharded_embedding import ShardedEmbedding, finish, init_distributed, initial_rows

COUNTERPARTS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.SparseAdam}


def check_correctness(device: torch.device) -> dict:
    n, d = 5000, 32
    results = {}
    for name in ("sgd", "adagrad", "adam", None):
        spec = {"name": name, "lr": 0.05} if name else None
        emb = ShardedEmbedding(n, d, page_size=512, device=device, fused_optimizer=spec, seed=1)
        ref = torch.nn.Embedding(n, d, sparse=True).to(device)
        with torch.no_grad():
            ref.weight.copy_(initial_rows(1, d, 0, n).to(device))
        ref_opt = COUNTERPARTS[name or "sgd"](ref.parameters(), lr=0.05)
        opt = torch.optim.SGD(emb.parameters(), lr=0.05) if spec is None else None
        g = torch.Generator().manual_seed(0)
        worst = 0.0
        for step in range(5):
            ids = torch.randint(0, n, (4096,), generator=g)
            if step % 2:
                ids = ids.to(device)  # ids may arrive on either device
            w = torch.randn(4096, d, generator=g).to(device)
            out = emb(ids.to(torch.int32) if step == 3 else ids)
            want = ref(ids.to(device))
            worst = max(worst, (out - want).abs().max().item())
            (out * w).sum().backward()
            (want * w).sum().backward()
            ref_opt.step()
            ref_opt.zero_grad()
            if opt is not None:
                opt.step()
                opt.zero_grad()
        table_err = (emb.full_table() - ref.weight.detach()).abs().max().item()
        assert emb.weight.device.type == device.type, emb.weight.device
        assert worst < 1e-4 and table_err < 1e-4, (name, worst, table_err)
        results[name or "sparse_sgd"] = {"forward_max_err": worst, "table_max_err_after_5_steps": table_err}
    emb = ShardedEmbedding(n, d, page_size=512, device=device, comm_dtype=torch.bfloat16)
    out = emb(torch.arange(100, device=device))
    assert torch.equal(out, emb.full_table()[:100])  # one rank: nothing travels, nothing rounds
    return results


def time_steps(step, warmup=5, steps=30, device=None) -> float:
    for i in range(warmup):
        step(i)
    times = []
    for i in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def benchmark(device: torch.device, rows: int, dim: int, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    u = torch.rand(40, batch, generator=g, dtype=torch.float64)
    ids = [((rows + 1) ** u[i] - 1).floor().long().clamp_(0, rows - 1).to(device) for i in range(40)]  # Zipf-like
    w = torch.randn(batch, dim, generator=g).to(device)
    ours = ShardedEmbedding(rows, dim, page_size=4096, device=device, fused_optimizer={"name": "sgd", "lr": 0.05})

    def step_ours(i):
        (ours(ids[i % 40]) * w).sum().backward()

    ms_ours = time_steps(step_ours, device=device)
    ours = None  # free the table before the reference allocates its own
    ref = torch.nn.Embedding(rows, dim, sparse=True).to(device)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)

    def step_ref(i):
        (ref(ids[i % 40]) * w).sum().backward()
        opt.step()
        opt.zero_grad()

    ms_ref = time_steps(step_ref, device=device)
    return {"rows": rows, "dim": dim, "batch": batch, "ours_fused_sgd_ms": round(ms_ours, 3),
            "nn_embedding_sparse_sgd_ms": round(ms_ref, 3), "ours_over_nn_embedding_speed": round(ms_ref / ms_ours, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--skip-m", action="store_true", help="skip the 10M x 128 timing")
    a = ap.parse_args()
    init_distributed("nccl" if a.device == "cuda" else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if a.device == "cuda" else torch.device("cpu")
    record = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "backend": dist.get_backend(),
              "device": torch.cuda.get_device_name(device) if a.device == "cuda" else "cpu",
              "world": dist.get_world_size(), "correctness": check_correctness(device),
              "timings": [benchmark(device, 1_000_000, 64, 16384)]}
    if not a.skip_m:
        record["timings"].append(benchmark(device, 10_000_000, 128, 32768))
    if dist.get_rank() == 0:
        print("GPU_CHECK " + json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
    finish()
