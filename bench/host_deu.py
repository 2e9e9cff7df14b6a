"""Per-call time of ``kfuse.deu`` on small tensors, where the host, not the kernels, sets the
speed (DEU networks are small: the paper's point), beside ``torch.sigmoid`` through autograd.

Back-to-back eager calls timed with ``timeit`` (min and median of 9 repeats): forward without
and with an autograd node, and forward+backward (``torch.autograd.grad``). Usage:
``python bench/host_deu.py [--device cpu] [--backend auto] [--shapes 4x32 64x32 256x256]``.
An A/B against another checkout: ``PYTHONPATH=<its python/> python bench/host_deu.py``.
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import torch

import kfuse
from kfuse.demos._args import positive
from kfuse.reference.deu import deu_init_coeffs


def time_shape(shape: list[int], device: torch.device, backend: str, number: int) -> None:
    x = torch.randn(*shape, device=device)
    coeffs = deu_init_coeffs(shape[-1]).to(device)
    xg, cg = x.clone().requires_grad_(), coeffs.clone().requires_grad_()
    gy = torch.randn_like(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cases = {
        "fwd, no grad": lambda: kfuse.deu(x, coeffs, backend=backend),
        "fwd, grad": lambda: kfuse.deu(xg, cg, backend=backend),
        "fwd+bwd": lambda: torch.autograd.grad(kfuse.deu(xg, cg, backend=backend), (xg, cg), gy),
        "torch.sigmoid fwd+bwd": lambda: torch.autograd.grad(torch.sigmoid(xg), (xg,), gy),
    }
    for name, fn in cases.items():
        def batch(fn=fn) -> None:
            for _ in range(number):
                fn()
            sync()  # once per batch: the kernels may run behind the host

        fn()
        times = [t / number * 1e6 for t in timeit.repeat(batch, number=1, repeat=9)]
        print(f"{'x'.join(map(str, shape)):>10} {name:22s} min {min(times):8.1f} us  "
              f"median {statistics.median(times):8.1f} us per call")


def _shape(text: str) -> list[int]:
    """An argparse type: "4x32" -> [4, 32], every size > 0."""
    try:
        shape = [int(s) for s in text.split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is sizes joined by x (4x32); got {text!r}") from None
    if not all(n > 0 for n in shape):
        raise argparse.ArgumentTypeError(f"sizes must be > 0; got {text!r}")
    return shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--shapes", type=_shape, nargs="+", default=[[4, 32], [64, 32], [256, 256]],
                        help="shapes such as 4x32 (default: 4x32 64x32 256x256)")
    parser.add_argument("--number", type=positive(int), default=2000, help="calls per repeat")
    args = parser.parse_args()
    print(f"kfuse from {kfuse.__file__}; backends: {kfuse.availability()}")
    for shape in args.shapes:
        time_shape(shape, torch.device(args.device), args.backend, args.number)


if __name__ == "__main__":
    main()
