"""DEU against fixed and learned activations on small MLPs, at equal parameter counts.

The DEU paper (Torkamani et al., AAAI 2020) claims networks with Differential Equation Unit
activations stay accurate when made small. This demo checks that on scikit-learn's bundled
8x8 digits dataset (``sklearn.datasets.load_digits``, no download): the MLP
``64 -> width -> activation -> 10`` is trained with

- ``ReLU``;
- ``PReLU``: one learned negative slope per neuron (``nn.PReLU(width)``);
- ``Swish-β``: ``x·sigmoid(β x)``, one learned β per neuron (init 1);
- ``DEU paper``: ``kfuse.nn.DEU`` as the paper trains it: ``a, b, c ~ U(0, 1)``, ``c1 = c2 = 0``,
  one learning rate for every parameter, the exact gradient;
- ``DEU recipe``: ``kfuse.nn.DEU(init="oscillator")`` (every neuron starts at ``a = c = 1``,
  ``b = c1 = c2 = 0``: ``y = H(t)·(1 − cos t)``) with ``kfuse.nn.deu_param_groups(coeff_lr=0.3·lr)``,
  the exact gradient (``b`` stays 0: the neurons keep the bounded oscillator / hyperbolic family;
  ``bench/results/2026-12-02-cpu-deu-paper.md`` has the measurements behind the choice);

at several sizes, the width of each activation chosen so that its parameter count is the nearest
to DEU's at the same row (DEU has 5 coefficients per neuron, PReLU and Swish-β one, ReLU none).
Mean ± std test accuracy over the seeds is printed as a table.

Fair by construction: one fixed stratified train/test split, features standardised on the training
split, the same optimiser (Adam), batch size, batch order and epochs for all. Each (activation,
width) gets the same learning-rate search: every rate in ``LR_GRID`` on a validation split carved
from the training split (one seed, 0), the best then trains on the whole training split. The test set
is used once, after the last epoch.

Run (CPU; 77 s on a 2-core machine at load average 4)::

    python examples/deu_digits.py              # full run: 5 widths, 5 seeds
    python examples/deu_digits.py --quick      # smoke run, a few seconds
    # the official code's gradient for both DEU rows: slower (a float64 PyTorch pass over the
    # degenerate neurons per step, ~15 s a run at width 4 under load), so fewer widths and seeds
    python examples/deu_digits.py --degenerate-grad gravitation --widths 4 16 --seeds 3
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

from kfuse._backends import BACKENDS
from kfuse.demos._args import check_cpu_backend, positive, threads
from kfuse.nn import DEU, deu_param_groups
from kfuse.reference.deu import EPS

SPLIT_SEED = 0
TEST_FRACTION = 0.25
VAL_FRACTION = 0.2  # of the training split, used only to pick the learning rate
LR_GRID = (3e-3, 1e-2, 3e-2)  # Adam, the same grid for every activation
BATCH_SIZE = 128
EPOCHS = 60
# The recipe's coefficient learning rate relative to the weights' (bench/results/2026-12-02-cpu-deu-paper.md:
# on the validation split, 0.3x beat 1x and 3x at widths 4, 16 and 64 with the oscillator start).
COEFF_LR_SCALE = 0.3
ACTIVATIONS = ("ReLU", "PReLU", "Swish-β", "DEU paper", "DEU recipe")
DEU_WIDTHS = (4, 8, 16, 32, 64)
PARAMS_PER_NEURON = {"ReLU": 0, "PReLU": 1, "Swish-β": 1, "DEU paper": 5, "DEU recipe": 5}


class SwishBeta(nn.Module):
    """``x·sigmoid(β x)`` with one learned β per neuron (Ramachandran et al., 2017), β init 1."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, num_features]``."""
        return x * torch.sigmoid(self.beta * x)


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass
class Result:
    activation: str
    width: int
    params: int
    lr: float
    accs: list[float]
    zero_band: float  # DEU: fraction of (step, neuron) pairs with |a|, |b| or |c| < EPS

    @property
    def mean(self) -> float:
        return 100 * statistics.fmean(self.accs)

    @property
    def std(self) -> float:
        """NaN with one seed (undefined, not 0)."""
        return 100 * statistics.stdev(self.accs) if len(self.accs) > 1 else math.nan

    def fmt(self) -> str:
        return f"{self.mean:5.1f}" + ("" if math.isnan(self.std) else f" ± {self.std:3.1f}")


def load_data() -> tuple[Data, Data]:
    """The digits dataset as (train/test, train'/validation) splits, both fixed and stratified.

    Each is standardised with the statistics of its own training part.
    """
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED)
    x_fit, x_val, y_fit, y_val = train_test_split(
        x_tr, y_tr, test_size=VAL_FRACTION, stratify=y_tr, random_state=SPLIT_SEED
    )
    return _standardise(x_tr, y_tr, x_te, y_te), _standardise(x_fit, y_fit, x_val, y_val)


def _standardise(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray) -> Data:
    scaler = StandardScaler().fit(x_tr)
    f32 = torch.float32
    return Data(
        torch.tensor(scaler.transform(x_tr), dtype=f32),
        torch.tensor(y_tr, dtype=torch.long),
        torch.tensor(scaler.transform(x_te), dtype=f32),
        torch.tensor(y_te, dtype=torch.long),
    )


def count_params(activation: str, width: int) -> int:
    return 64 * width + width + width * 10 + 10 + PARAMS_PER_NEURON[activation] * width


def matched_width(activation: str, deu_width: int) -> int:
    """The width whose parameter count is nearest to DEU's at ``deu_width`` (ties: the smaller)."""
    target = count_params("DEU paper", deu_width)
    return min(range(1, 2 * deu_width + 2), key=lambda w: (abs(count_params(activation, w) - target), w))


def make_model(activation: str, width: int, seed: int, backend: str = "auto",
               degenerate_grad: str = "exact") -> nn.Sequential:
    """``64 -> width -> activation -> 10``; the linear layers are drawn first, from ``seed``."""
    torch.manual_seed(seed)
    first, last = nn.Linear(64, width), nn.Linear(width, 10)
    act: nn.Module
    if activation == "ReLU":
        act = nn.ReLU()
    elif activation == "PReLU":
        act = nn.PReLU(width)
    elif activation == "Swish-β":
        act = SwishBeta(width)
    else:
        init = "paper" if activation == "DEU paper" else "oscillator"
        act = DEU(width, backend=backend, init=init, degenerate_grad=degenerate_grad)
    return nn.Sequential(first, act, last)


def train_and_test(activation: str, model: nn.Sequential, data: Data, epochs: int, lr: float,
                   seed: int) -> tuple[float, float]:
    """Mini-batch Adam with cross-entropy; returns (test accuracy after the last epoch, the
    fraction of (step, neuron) pairs in the zero band for a DEU layer, else 0)."""
    coeff_lr = COEFF_LR_SCALE * lr if activation == "DEU recipe" else lr
    opt = torch.optim.Adam(deu_param_groups(model, lr=lr, coeff_lr=coeff_lr))
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)  # same batch order for every activation
    deu = model[1] if isinstance(model[1], DEU) else None
    zero, pairs = 0, 0
    n = data.x_train.shape[0]
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(BATCH_SIZE):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
            if deu is not None:
                zero += int((deu.coeffs.detach()[:, :3].abs() < EPS).any(1).sum())
                pairs += deu.num_features
    model.eval()
    with torch.no_grad():
        pred = model(data.x_test).argmax(dim=1)
    return (pred == data.y_test).float().mean().item(), zero / pairs if pairs else 0.0


def evaluate(activation: str, width: int, data: Data, seeds: Sequence[int], epochs: int, lr: float,
             backend: str, degenerate_grad: str) -> list[tuple[float, float]]:
    """(test accuracy, zero-band fraction) of one fresh model per seed."""
    return [train_and_test(activation, make_model(activation, width, s, backend, degenerate_grad), data, epochs, lr, s)
            for s in seeds]


def run(deu_widths: Sequence[int], seeds: Sequence[int], search_seeds: Sequence[int], lr_grid: Sequence[float],
        epochs: int, backend: str = "auto", degenerate_grad: str = "exact",
        activations: Sequence[str] = ACTIVATIONS, log: Callable[[str], None] = print) -> list[list[Result]]:
    """One row per DEU width: a :class:`Result` per activation, at the matched width."""
    data, search_data = load_data()
    log(f"digits: {len(data.y_train)} train / {len(data.y_test)} test (lr picked on {len(search_data.y_train)} / "
        f"{len(search_data.y_test)} validation), epochs={epochs}, batch={BATCH_SIZE}, Adam lr grid={list(lr_grid)}, "
        f"seeds={list(seeds)}, search seeds={list(search_seeds)}, DEU backend={backend!r}, "
        f"degenerate_grad={degenerate_grad!r}, torch threads={torch.get_num_threads()}")
    rows = []
    for deu_width in deu_widths:
        t0 = time.perf_counter()
        row = []
        for activation in activations:
            width = deu_width if activation.startswith("DEU") else matched_width(activation, deu_width)
            val = {lr: statistics.fmean(a for a, _ in evaluate(activation, width, search_data, search_seeds, epochs,
                                                               lr, backend, degenerate_grad))
                   for lr in lr_grid}
            lr = max(lr_grid, key=lambda r: val[r])  # ties go to the first (smallest) rate
            out = evaluate(activation, width, data, seeds, epochs, lr, backend, degenerate_grad)
            row.append(Result(activation, width, count_params(activation, width), lr, [a for a, _ in out],
                              statistics.fmean(z for _, z in out)))
        log(f"  DEU width {deu_width:3d}: " + "  ".join(f"{r.activation} {r.fmt()}" for r in row)
            + f"  [{time.perf_counter() - t0:.1f} s]")
        rows.append(row)
    return rows


def verdict(deu: Result, best_other: Result) -> str:
    """``wins``/``loses`` when the means differ by more than the larger std, else ``ties``; ``n/a`` with
    one seed (no std to compare with)."""
    if math.isnan(deu.std) or math.isnan(best_other.std):
        return "n/a (1 seed)"
    diff = deu.mean - best_other.mean
    if abs(diff) <= max(deu.std, best_other.std):
        return "ties"
    return "wins" if diff > 0 else "loses"


def print_table(rows: list[list[Result]], n_seeds: int) -> None:
    print(f"\nTest accuracy (%), mean ± std over {n_seeds} seeds; width (params) per activation; "
          "lr = Adam rate picked on validation")
    names = [r.activation for r in rows[0]]
    header = " | ".join(f"{n:>22}" for n in names) + " | DEU recipe vs best other"
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = [f"{r.fmt()} w{r.width}({r.params})" for r in row]
        recipe = next((r for r in row if r.activation == "DEU recipe"), None)
        others = [r for r in row if not r.activation.startswith("DEU")]
        tail = ""
        if recipe is not None and others:
            best = max(others, key=lambda r: r.mean)
            tail = f"{verdict(recipe, best)} ({recipe.mean - best.mean:+.1f} vs {best.activation})"
        print(" | ".join(f"{c:>22}" for c in cells) + " | " + tail)
    print("\nlearning rates, by DEU width: " + "; ".join(
        f"{row[-1].width}: " + ", ".join(f"{r.activation} {r.lr:g}" for r in row) for row in rows))
    print("DEU zero band (|a|, |b| or |c| < 0.01), % of (step, neuron) pairs, by DEU width: " + "; ".join(
        f"{row[-1].width}: " + ", ".join(f"{r.activation} {100 * r.zero_band:.1f}"
                                         for r in row if r.activation.startswith("DEU")) for row in rows))


def main(argv: Sequence[str] | None = None) -> list[list[Result]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: few epochs; widths 4 and 16 and 2 seeds unless --widths/--seeds are given")
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                        help="backend passed to kfuse.nn.DEU (default: auto)")
    parser.add_argument("--degenerate-grad", default="exact", choices=["exact", "gravitation"])
    parser.add_argument("--seeds", type=positive(int), default=None, help="test seeds (default 5; 2 with --quick)")
    parser.add_argument("--widths", type=positive(int), nargs="+", default=None,
                        help=f"DEU widths (default {' '.join(map(str, DEU_WIDTHS))}; 4 16 with --quick)")
    # One thread: the networks are tiny; with 2 on a loaded 2-core machine a deu_oscillation step took 217 ms, not 3.6.
    parser.add_argument("--threads", type=threads, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    check_cpu_backend(parser, args.backend)
    torch.set_num_threads(args.threads)

    # --quick sets the defaults and the epochs; --widths/--seeds given explicitly are kept.
    widths = tuple(args.widths or ((4, 16) if args.quick else DEU_WIDTHS))
    seeds = tuple(range(args.seeds or (2 if args.quick else 5)))
    search_seeds, lr_grid, epochs = (0,), (LR_GRID[1:] if args.quick else LR_GRID), (10 if args.quick else EPOCHS)

    start = time.perf_counter()
    rows = run(widths, seeds, search_seeds, lr_grid, epochs, args.backend, args.degenerate_grad)
    print_table(rows, len(seeds))
    print(f"\ntotal runtime: {time.perf_counter() - start:.1f} s")
    return rows


if __name__ == "__main__":
    main()
