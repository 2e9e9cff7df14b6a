"""How many neurons does an oscillation take? DEU against ReLU and tanh.

The DEU paper (Torkamani et al., AAAI 2020) argues that one DEU neuron can learn behaviour, such
as oscillation, that takes many fixed-activation neurons. This demo fits ``y = sin(3π x)`` on
``x ∈ [-1, 1]`` (three periods, 256 evenly spaced points) with one hidden layer of k neurons,
``Linear(1, k) → activation → Linear(k, 1)``, full-batch Adam on the mean squared error, and
reports for each activation the smallest k whose median MSE over the seeds is below a fixed bound
(0.01, 2% of the target's variance 0.5).

Activations: ReLU, tanh, ``DEU paper`` (``a, b, c ~ U(0, 1)``, ``c1 = c2 = 0``, one learning rate)
and ``DEU recipe`` (``init="oscillator"``, coefficient learning rate 0.3× the weights', as in
``examples/deu_digits.py``). The linear layers are initialised as ``nn.Linear`` does, from a
generator seeded per (k, seed), the same draws for every activation.

Every (k, seed) network of one activation trains at once: the neurons of all of them are stacked
on one neuron axis (DEU's neurons are independent; each network's output sums only its own
neurons), and Adam is elementwise, so this is training them one by one, ~100x faster on a CPU where
a step of one tiny network is all Python overhead: up to float rounding, which training amplifies
(the output layer's sum over the stack rounds differently with other networks beside it, so a
network's MSE can move in its third digit with the ``--ks`` it shares a run with).

Run (CPU; 17 s on a 2-core machine at load average 3.9, 76 s with gravitation)::

    python examples/deu_oscillation.py
    python examples/deu_oscillation.py --steps 500 --seeds 3     # quicker
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kfuse._backends import BACKENDS
from kfuse.demos._args import check_cpu_backend, positive, threads
from kfuse.nn import DEU, deu_param_groups, init_deu_coeffs
from kfuse.reference.deu import EPS

KS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
MSE_BOUND = 0.01
N_POINTS = 256
PERIODS = 3
LR = 1e-2
COEFF_LR_SCALE = 0.3  # the digits recipe's
ACTIVATIONS = ("ReLU", "tanh", "DEU paper", "DEU recipe")


def target(n_points: int = N_POINTS) -> tuple[Tensor, Tensor]:
    """``x [n_points]`` evenly spaced in [-1, 1] and ``y = sin(PERIODS·π·x)``."""
    x = torch.linspace(-1.0, 1.0, n_points)
    return x, torch.sin(PERIODS * math.pi * x)


class StackedNets(nn.Module):
    """Networks ``Linear(1, k) → act → Linear(k, 1)`` for every (k, seed), side by side.

    Hidden neuron j of network i is column ``offsets[i] + j`` of one ``[P, total]`` hidden layer;
    ``forward`` returns ``[P, n_nets]``.
    """

    def __init__(self, activation: str, ks: Sequence[int], seeds: Sequence[int], backend: str = "auto",
                 degenerate_grad: str = "exact") -> None:
        super().__init__()
        self.nets = [(k, s) for k in ks for s in seeds]
        w1, b1, w2, b2, coeffs = [], [], [], [], []
        for k, s in self.nets:
            gen = torch.Generator().manual_seed(1000 * k + s)
            # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
            w1.append(torch.empty(k).uniform_(-1, 1, generator=gen))
            b1.append(torch.empty(k).uniform_(-1, 1, generator=gen))
            w2.append(torch.empty(k).uniform_(-1 / math.sqrt(k), 1 / math.sqrt(k), generator=gen))
            b2.append(torch.empty(1).uniform_(-1 / math.sqrt(k), 1 / math.sqrt(k), generator=gen))
            if activation.startswith("DEU"):
                init = "paper" if activation == "DEU paper" else "oscillator"
                coeffs.append(init_deu_coeffs(k, init, generator=gen))
        self.w1, self.b1 = nn.Parameter(torch.cat(w1)), nn.Parameter(torch.cat(b1))
        self.w2, self.b2 = nn.Parameter(torch.cat(w2)), nn.Parameter(torch.cat(b2))
        total = self.w1.numel()
        net_of = torch.cat([torch.full((k,), i) for i, (k, _) in enumerate(self.nets)])
        # [total, n_nets] one-hot: the output layer's sum per network as one matmul (index_add_
        # along dim 1 took 190 ms a step here, the matmul ~1 ms).
        self.register_buffer("assign", nn.functional.one_hot(net_of, len(self.nets)).float())
        self.act: nn.Module
        if activation == "ReLU":
            self.act = nn.ReLU()
        elif activation == "tanh":
            self.act = nn.Tanh()
        else:
            self.act = DEU(total, backend=backend, degenerate_grad=degenerate_grad)
            with torch.no_grad():
                self.act.coeffs.copy_(torch.cat(coeffs))

    def forward(self, x: Tensor) -> Tensor:
        """``x [P]`` → ``[P, n_nets]``."""
        h = self.act(x[:, None] * self.w1 + self.b1) * self.w2  # [P, total]
        return h @ self.assign + self.b2


def fit(activation: str, ks: Sequence[int], seeds: Sequence[int], steps: int, lr: float = LR,
        backend: str = "auto", degenerate_grad: str = "exact",
        stats: dict | None = None) -> dict[tuple[int, int], float]:
    """Final MSE of every (k, seed) network of ``activation`` after ``steps`` full-batch Adam steps.
    ``stats["zero_band"]`` (when given, DEU only) gets the fraction of (step, neuron) pairs with
    ``|a|``, ``|b|`` or ``|c|`` below EPS."""
    x, y = target()
    model = StackedNets(activation, ks, seeds, backend, degenerate_grad)
    deu = model.act if isinstance(model.act, DEU) else None
    zero = 0
    coeff_lr = COEFF_LR_SCALE * lr if activation == "DEU recipe" else lr
    opt = torch.optim.Adam(deu_param_groups(model, lr=lr, coeff_lr=coeff_lr))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        # Sum of the networks' MSEs: each network's parameters get its own MSE's gradient.
        ((model(x) - y[:, None]) ** 2).mean(0).sum().backward()
        opt.step()
        if deu is not None and stats is not None:
            zero += int((deu.coeffs.detach()[:, :3].abs() < EPS).any(1).sum())
    if deu is not None and stats is not None:
        stats["zero_band"] = zero / (steps * deu.num_features)
    with torch.no_grad():
        mse = ((model(x) - y[:, None]) ** 2).mean(0)
    return {net: mse[i].item() for i, net in enumerate(model.nets)}


def smallest_k(mses: dict[tuple[int, int], float], ks: Sequence[int], seeds: Sequence[int],
               bound: float = MSE_BOUND) -> int | None:
    """The smallest k whose median MSE over ``seeds`` is below ``bound`` (None: no k in ``ks``)."""
    for k in sorted(set(ks)):  # smallest first, whatever order --ks gave
        if statistics.median(mses[k, s] for s in seeds) < bound:
            return k
    return None


def main(argv: Sequence[str] | None = None) -> dict[str, dict[tuple[int, int], float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive(int), default=2000)
    parser.add_argument("--seeds", type=positive(int), default=5)
    parser.add_argument("--ks", type=positive(int), nargs="+", default=list(KS))
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS])
    parser.add_argument("--degenerate-grad", default="exact", choices=["exact", "gravitation"])
    # One thread: the networks are tiny; with 2 on a loaded 2-core machine a deu_oscillation step took 217 ms, not 3.6.
    parser.add_argument("--threads", type=threads, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    check_cpu_backend(parser, args.backend)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    seeds = tuple(range(args.seeds))
    print(f"y = sin({PERIODS}π x) on {N_POINTS} points of [-1, 1]; Linear(1,k) → act → Linear(k,1); "
          f"full-batch Adam lr {LR}, {args.steps} steps; seeds {list(seeds)}; bound: median MSE < {MSE_BOUND}; "
          f"DEU degenerate_grad={args.degenerate_grad!r}, torch threads={torch.get_num_threads()}")
    results = {}
    for activation in ACTIVATIONS:
        t0 = time.perf_counter()
        stats: dict = {}
        results[activation] = fit(activation, args.ks, seeds, args.steps, backend=args.backend,
                                  degenerate_grad=args.degenerate_grad, stats=stats)
        zero = f", zero band {100 * stats['zero_band']:.1f}% of (step, neuron) pairs" if stats else ""
        print(f"  {activation}: {time.perf_counter() - t0:.1f} s{zero}")
    print(f"\nmedian MSE over {len(seeds)} seeds (best seed in brackets), by hidden width k")
    header = f"{'k':>3} | " + " | ".join(f"{a:>17}" for a in ACTIVATIONS)
    print(header)
    print("-" * len(header))
    for k in args.ks:
        cells = []
        for a in ACTIVATIONS:
            vals = [results[a][k, s] for s in seeds]
            cells.append(f"{statistics.median(vals):.4f} [{min(vals):.4f}]")
        print(f"{k:>3} | " + " | ".join(f"{c:>17}" for c in cells))
    print(f"\nsmallest k with median MSE < {MSE_BOUND}: " + ", ".join(
        f"{a} {smallest_k(results[a], args.ks, seeds) or f'> {max(args.ks)}'}" for a in ACTIVATIONS))
    print(f"\ntotal runtime: {time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main()
