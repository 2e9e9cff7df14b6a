"""DEU vs ReLU on small MLPs: does a learned per-neuron activation keep a narrow network accurate?

The DEU paper (Torkamani et al., AAAI 2020) claims networks with Differential Equation Unit
activations stay accurate when made small. This demo checks that on scikit-learn's bundled
8x8 digits dataset (``sklearn.datasets.load_digits``, no download): the same MLP
``64 -> width -> activation -> 10`` is trained with ReLU and with ``kfuse.nn.DEU`` at several
hidden widths, several seeds each, and the mean ± std test accuracy is printed as a table.

The comparison is kept fair: one fixed stratified train/test split, features standardised on
the training split only, the same architecture, initialisation of the linear layers, optimiser,
batch size, batch order and number of epochs for both activations. The learning rate gets the
same small search for both: for each (activation, width), every rate in ``LR_GRID`` is tried on
a stratified validation split carved out of the training set, and the best one is then used to
train on the whole training set. The test set is used only once, after the last epoch (no early
stopping). The parameter-count column includes DEU's 5 coefficients per hidden neuron.

Run (CPU is fine, under 2 minutes)::

    python examples/deu_digits.py              # full run
    python examples/deu_digits.py --quick      # smoke run, ~10 s
    python examples/deu_digits.py --backend reference
"""

from __future__ import annotations

import argparse
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

from kfuse.nn import DEU

SPLIT_SEED = 0
TEST_FRACTION = 0.25
VAL_FRACTION = 0.2  # of the training split, used only to pick the learning rate
# Adam learning rates searched, the same grid for both activations. One rate is used for every
# parameter (linear weights and DEU coefficients alike): DEU gets no learning rate of its own.
LR_GRID = (3e-3, 1e-2, 3e-2)
BATCH_SIZE = 128


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

    def fmt(self) -> str:
        mean = 100 * statistics.fmean(self.accs)
        std = 100 * statistics.stdev(self.accs) if len(self.accs) > 1 else 0.0
        return f"{mean:5.1f} ± {std:3.1f}"


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


def make_model(activation: str, width: int, seed: int, backend: str) -> nn.Module:
    """``64 -> width -> activation -> 10``; the linear layers are identical for both activations."""
    torch.manual_seed(seed)
    first, last = nn.Linear(64, width), nn.Linear(width, 10)
    act: nn.Module = DEU(width, backend=backend) if activation == "DEU" else nn.ReLU()
    # DEU draws its coefficients after the linear layers, so both models share the same weights.
    return nn.Sequential(first, act, last)


def train_and_test(model: nn.Module, data: Data, epochs: int, lr: float, seed: int) -> float:
    """Mini-batch Adam with cross-entropy; returns test accuracy after the last epoch."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)  # same batch order for both activations
    n = data.x_train.shape[0]
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(BATCH_SIZE):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(data.x_test).argmax(dim=1)
    return (pred == data.y_test).float().mean().item()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def evaluate(
    activation: str, width: int, data: Data, seeds: Sequence[int], epochs: int, lr: float, backend: str
) -> list[float]:
    """Test accuracy of one fresh model per seed."""
    return [train_and_test(make_model(activation, width, seed, backend), data, epochs, lr, seed) for seed in seeds]


def run(
    widths: Sequence[int],
    seeds: Sequence[int],
    search_seeds: Sequence[int],
    lr_grid: Sequence[float],
    epochs: int,
    backend: str,
    log: Callable[[str], None] = print,
) -> list[tuple[Result, Result]]:
    data, search_data = load_data()
    log(
        f"digits: {len(data.y_train)} train / {len(data.y_test)} test "
        f"(lr picked on {len(search_data.y_train)} / {len(search_data.y_test)} validation), "
        f"epochs={epochs}, batch={BATCH_SIZE}, Adam lr grid={list(lr_grid)}, "
        f"seeds={list(seeds)}, DEU backend={backend!r}"
    )
    rows = []
    for width in widths:
        t0 = time.perf_counter()
        pair = []
        for activation in ("ReLU", "DEU"):
            # Same search budget for both activations: every lr in the grid, the same seeds.
            val = {
                lr: statistics.fmean(evaluate(activation, width, search_data, search_seeds, epochs, lr, backend))
                for lr in lr_grid
            }
            lr = max(lr_grid, key=lambda r: val[r])  # ties go to the first (smallest) rate
            accs = evaluate(activation, width, data, seeds, epochs, lr, backend)
            params = count_params(make_model(activation, width, 0, backend))
            pair.append(Result(activation, width, params, lr, accs))
        relu, deu = pair
        log(
            f"  width {width:3d}: ReLU {relu.fmt()}% (lr {relu.lr:g})  "
            f"DEU {deu.fmt()}% (lr {deu.lr:g})  [{time.perf_counter() - t0:.1f} s]"
        )
        rows.append((relu, deu))
    return rows


def print_table(rows: list[tuple[Result, Result]], n_seeds: int) -> None:
    print(
        f"\nTest accuracy (%), mean ± std over {n_seeds} seeds; lr = Adam rate picked on validation; "
        "params include DEU's 5 per neuron"
    )
    header = (
        f"{'width':>5} | {'ReLU params':>11} | {'lr':>6} | {'ReLU acc':>11} | "
        f"{'DEU params':>10} | {'lr':>6} | {'DEU acc':>11} | {'DEU-ReLU':>8}"
    )
    print(header)
    print("-" * len(header))
    for relu, deu in rows:
        diff = 100 * (statistics.fmean(deu.accs) - statistics.fmean(relu.accs))
        print(
            f"{relu.width:>5} | {relu.params:>11} | {relu.lr:>6g} | {relu.fmt():>11} | "
            f"{deu.params:>10} | {deu.lr:>6g} | {deu.fmt():>11} | {diff:>+8.1f}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 widths, 2 seeds, few epochs")
    parser.add_argument("--backend", default="auto", help="backend passed to kfuse.nn.DEU (default: auto)")
    args = parser.parse_args(argv)

    if args.quick:
        widths, seeds, search_seeds, lr_grid, epochs = (4, 16), (0, 1), (0,), LR_GRID[1:], 10
    else:
        widths, seeds, search_seeds, lr_grid, epochs = (4, 8, 16, 32, 64), (0, 1, 2), (0, 1), LR_GRID, 60

    start = time.perf_counter()
    rows = run(widths, seeds, search_seeds, lr_grid, epochs, args.backend)
    print_table(rows, len(seeds))
    print(f"\ntotal runtime: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
