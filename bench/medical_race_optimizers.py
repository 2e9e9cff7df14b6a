"""The medical demo's throughput race with each optimizer: how much of kfuse's lead over the
``nn.EmbeddingBag`` loop comes from the pairing of optimizers.

The demo races kfuse's row-wise Adagrad against the loop's ``torch.optim.Adagrad``, which is element-wise (torch
has no row-wise one: D accumulators a row, more optimizer work). Here the same race (the demo's ``race``: the
same batches, the builds' steps interleaved) runs with row-wise Adagrad and then with SGD in every build, at the
demo's full size (74k / 79k / 5k codes, D = 128, batches of 1024 visits, 20000 synthetic patients) or ``--small``.

Usage: ``python bench/medical_race_optimizers.py [--small] [--seconds S]``.
"""

from __future__ import annotations

import argparse
import platform

import torch

from kfuse.data.claims import ClaimsConfig, load_code_vocab, synthetic_claims
from kfuse.demos.medical_codes import race


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="the demo's --small size (60 categories, D=32)")
    p.add_argument("--seconds", type=float, default=8.0, help="time per build in each race (8)")
    a = p.parse_args()
    vocab = load_code_vocab(rx_codes=600 if a.small else 5000, rx_classes=40 if a.small else 150, seed=0)
    if a.small:
        vocab = vocab.subset(60, 40, seed=0)
    claims = synthetic_claims(vocab, ClaimsConfig(patients=3000 if a.small else 20000, seed=0))
    dim, batch = (32, 256) if a.small else (128, 1024)
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}; sizes {vocab.sizes}, D={dim}, "
          f"batches of {batch} visits")
    for optimizer in ("rowwise_adagrad", "sgd"):
        speed = race(vocab.sizes, dim, claims, batch, a.seconds, torch.device("cpu"), 0, optimizer)
        cells = [f"{k} {v / 1e6:.2f} M codes/s" if isinstance(v, float) else f"{k} {v}" for k, v in speed.items()]
        ratios = [f"kfuse/{k} {speed['kfuse'] / v:.2f}x" for k, v in speed.items()
                  if k != "kfuse" and isinstance(v, float) and isinstance(speed.get("kfuse"), float)]
        print(f"{optimizer}: " + "; ".join(cells) + " | " + ", ".join(ratios), flush=True)


if __name__ == "__main__":
    main()
