"""Data-parallel training of the medical-code tables on 2 gloo processes: what the fused optimizer's
row-sparse exchange costs against DistributedDataParallel's dense all-reduce.

The medical shape of ``kfuse.bench.embedding`` (3 tables of 74k, 79k and 20k rows, D = 128, fp32,
~20 Zipf codes per bag), ``--batch`` bags per feature per rank, each rank its own batch (seeded by
rank and step). Per training step (forward, backward of a fixed random ``grad_out``, update):

- ``fused``: ``kfuse.nn.MultiTableEmbeddingBag(optimizer="rowwise_adagrad", process_group=WORLD)``:
  each rank's row-sparse gradients (unique rows, summed) are all-gathered and summed in rank order,
  then every rank updates the union of rows (``kfuse.nn.embedding._all_reduce_rows``);
- ``ddp``: ``DistributedDataParallel`` over the module with the fused optimizer off (dense table
  gradients, all-reduced by DDP's buckets) and ``torch.optim.Adagrad``;
- ``fused, 1 process``: the fused step alone on one process (no exchange): the floor for ``fused``.

Printed: the median step time over ``--steps`` steps (after 2 warm-up steps) of rank 0, and the
bytes each rank sends per step (fused: the padded row ids and gradients of its all-gathers; DDP: the
tables' gradients, which a ring all-reduce sends 2(n-1)/n times). Threads: ``--threads`` per process
(the 2 processes share the machine's cores). Usage:
``python bench/ddp_embedding.py [--batch 1024] [--steps 10] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import kfuse
from kfuse.bench import embedding as emb
from kfuse.demos._args import positive

_ROWS, _DIM, _ = emb.SHAPES["medical"]
TABLES = [(r, _DIM) for r in _ROWS]


def _batch(batch: int, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices, offsets, grad_out) of one rank's step (the bench's generator; its tables dropped)."""
    inp = emb.make_inputs(emb._case(torch.device("cpu"), torch.float32, "train", "medical", batch), 1000 * step + rank)
    return inp.indices, inp.offsets, inp.grad_out


def _module(tables: list[tuple[int, int]], fused: bool, group: object) -> kfuse.nn.MultiTableEmbeddingBag:
    torch.manual_seed(0)
    return kfuse.nn.MultiTableEmbeddingBag(tables, optimizer="rowwise_adagrad" if fused else None, lr=0.01,
                                           eps=1e-8, process_group=group if fused else None)


def _run(mode: str, batch: int, steps: int, rank: int) -> tuple[list[float], float]:
    """Step times (s) and bytes sent per step by this rank (the mean over steps)."""
    data = [_batch(batch, rank, s) for s in range(steps + 2)]
    fused = mode != "ddp"
    group = dist.group.WORLD if mode == "fused" else None
    m = _module(TABLES, fused, group)
    model = DDP(m) if mode == "ddp" else m
    opt = torch.optim.Adagrad(m.parameters(), lr=0.01, eps=1e-8) if mode == "ddp" else None
    times, sent = [], []
    for s, (indices, offsets, grad_out) in enumerate(data):
        if group is not None or mode == "ddp":
            dist.barrier()
        t0 = time.perf_counter()
        y = model(indices, offsets)
        y.backward(grad_out)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        if s < 2:
            continue
        times.append(elapsed)
        if mode == "fused":  # this rank's unique rows per table, padded to the largest rank's count
            sent.append(_fused_bytes(indices, offsets))
        elif mode == "ddp":
            n = dist.get_world_size()
            sent.append(2 * (n - 1) / n * sum(r * d * 4 for r, d in TABLES))
    return times, statistics.mean(sent) if sent else 0.0


def _fused_bytes(indices: torch.Tensor, offsets: torch.Tensor) -> float:
    """Bytes this rank's all-gathers send: per table, its unique rows' ids (int64) and fp32 gradients,
    padded to the largest count over the ranks (the counts are exchanged first; 8 bytes each)."""
    b = (offsets.numel() - 1) // len(TABLES)
    local = torch.tensor([float(indices[int(offsets[t * b]):int(offsets[(t + 1) * b])].unique().numel())
                          for t in range(len(TABLES))])
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return float(sum(8 + int(c) * (8 + 4 * d) for c, (_, d) in zip(local.tolist(), TABLES, strict=True)))


def _worker(rank: int, port: int, args: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for mode in ("fused", "ddp"):
            times, sent = _run(mode, args.batch, args.steps, rank)
            if rank == 0:
                out[mode] = (statistics.median(times), sent)
        dist.barrier()
        if rank == 0:
            times, _ = _run("single", args.batch, args.steps, rank)
            out["fused, 1 process"] = (statistics.median(times), 0.0)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=positive(int), default=1024, help="bags per feature per rank")
    parser.add_argument("--steps", type=positive(int), default=10)
    parser.add_argument("--threads", type=positive(int), default=1, help="torch threads per process")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(port, args, out), nprocs=2, join=True)
    print(f"2 gloo processes x {args.threads} thread(s), medical shape, B = {args.batch} per rank, fp32, "
          f"median of {args.steps} steps (rank 0)")
    print("| method | step ms | MB sent per rank per step |")
    print("|---|---|---|")
    for mode in ("fused", "ddp", "fused, 1 process"):
        ms, sent = out[mode]
        print(f"| {mode} | {ms * 1e3:.2f} | {sent / 1e6:.2f} |")


if __name__ == "__main__":
    main()
