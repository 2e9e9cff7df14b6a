"""The official DEU toy: two nested circles, ``Linear(2,4) → DEU(4) → Linear(4,4) → Linear(4,2)``.

Reproduces the official code's ``main.py`` (github.com/rooshenas/deu): scikit-learn's
``make_circles(n_samples=500, factor=0.5, noise=0.05)``, the first 100 points as the training set,
full-batch Adam at lr 0.1 for 600 epochs, cross-entropy. Its README shows the loss at 0.0000 from
epoch 101 on. Here the same run is repeated over several seeds (the official script fixes none),
beside the same network with ReLU in place of DEU, and the remaining 400 points are a test set.
The learned activations of the first seed are drawn, one curve per neuron over t, to a PNG.

Run (CPU; 7 s for 5 seeds on a 2-core machine at load average 3.5)::

    python examples/deu_circles.py                      # 5 seeds, PNG to deu_circles.png
    python examples/deu_circles.py --seeds 0 1 2 --png /tmp/act.png --degenerate-grad gravitation
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from sklearn.datasets import make_circles
from torch import Tensor, nn

from kfuse._backends import BACKENDS
from kfuse.demos._args import check_cpu_backend, check_figures, positive, rng_seed, threads
from kfuse.nn import DEU
from kfuse.reference.deu import CASE_NAMES, EPS, deu_cases

DATA_SEED = 0  # make_circles' random_state (the official script draws a fresh set every run)
N_TRAIN = 100
EPOCHS = 600
LR = 0.1


@dataclass
class Run:
    """One training run: the loss every 100 epochs, the final train loss and test accuracy, and
    the fraction of (step, neuron) pairs with a coefficient in the zero band."""
    losses: list[float]
    final_loss: float
    test_acc: float
    zero_zone: float
    model: nn.Sequential


def circles(seed: int = DATA_SEED) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train [100, 2], y_train [100], x_test [400, 2], y_test [400])`` as the official script."""
    x, y = make_circles(n_samples=500, factor=0.5, noise=0.05, random_state=seed)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def make_model(activation: str, seed: int, degenerate_grad: str = "exact", backend: str = "auto") -> nn.Sequential:
    """The official network; ``activation`` is ``"DEU"`` or ``"ReLU"`` (same linear weights)."""
    torch.manual_seed(seed)
    first, mid, last = nn.Linear(2, 4), nn.Linear(4, 4), nn.Linear(4, 2)
    act = DEU(4, backend=backend, degenerate_grad=degenerate_grad) if activation == "DEU" else nn.ReLU()
    return nn.Sequential(first, act, mid, last)


def train(activation: str, seed: int, epochs: int = EPOCHS, degenerate_grad: str = "exact",
          backend: str = "auto") -> Run:
    """Full-batch Adam (lr 0.1), cross-entropy, ``epochs`` steps, as the official ``main.py``."""
    x, y, x_test, y_test = circles()
    model = make_model(activation, seed, degenerate_grad, backend)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    losses, zero, steps = [], 0, 0
    for epoch in range(epochs):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if epoch % 100 == 0:
            losses.append(loss.item())
        if activation == "DEU":
            zero += int((model[1].coeffs.detach()[:, :3].abs() < EPS).any(1).sum())
            steps += 4
    with torch.no_grad():
        final = loss_fn(model(x), y).item()
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    return Run(losses, final, acc, zero / steps if steps else 0.0, model)


def plot_activations(deu: DEU, path: str, t_range: tuple[float, float] = (-3.0, 3.0)) -> None:
    """Each neuron's learned activation y(t) over ``t_range``, one curve per neuron, to ``path``."""
    import matplotlib  # noqa: PLC0415 (optional, only for the figure)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    t = torch.linspace(*t_range, 601)
    with torch.no_grad():
        y = deu(t.unsqueeze(1).expand(-1, deu.num_features).contiguous())
    cases = deu_cases(deu.coeffs.detach())
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in range(deu.num_features):
        a, b, c, c1, c2 = deu.coeffs[n].tolist()
        ax.plot(t, y[:, n], label=f"neuron {n}: {a:.2f}y'' {b:+.2f}y' {c:+.2f}y, c1={c1:.2f}, c2={c2:.2f} "
                                  f"({CASE_NAMES[cases[n]]})")
    ax.set_xlabel("t (pre-activation)")
    ax.set_ylabel("y(t)")
    ax.set_title("DEU activations learned on nested circles")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[tuple[int, Run, Run]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=rng_seed, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=positive(int), default=EPOCHS)
    parser.add_argument("--png", default="deu_circles.png", help="where to save the activations' figure ('' for none)")
    parser.add_argument("--degenerate-grad", default="exact", choices=["exact", "gravitation"])
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS])
    # One thread: the networks are tiny; with 2 on a loaded 2-core machine a deu_oscillation step took 217 ms, not 3.6.
    parser.add_argument("--threads", type=threads, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    check_cpu_backend(parser, args.backend)
    check_figures(parser, png=args.png or None)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    print(f"make_circles(500, factor=0.5, noise=0.05, random_state={DATA_SEED}): first {N_TRAIN} points train, "
          f"400 test; full-batch Adam lr {LR}, {args.epochs} epochs; DEU degenerate_grad={args.degenerate_grad!r}")
    rows = []
    for seed in args.seeds:
        deu = train("DEU", seed, args.epochs, args.degenerate_grad, args.backend)
        relu = train("ReLU", seed, args.epochs)
        rows.append((seed, deu, relu))
        if seed == args.seeds[0]:
            print("DEU loss every 100 epochs (first seed): " + ", ".join(
                f"{e * 100 + 1}: {v:.4f}" for e, v in enumerate(deu.losses)))
            if args.png:
                plot_activations(deu.model[1], args.png)
                print(f"learned activations of seed {seed}: {args.png}")
    print(f"\n{'seed':>4} | {'DEU loss':>9} | {'DEU test acc':>12} | {'DEU zero-band':>13} | "
          f"{'ReLU loss':>9} | {'ReLU test acc':>13}")
    print("-" * 76)
    for seed, deu, relu in rows:
        print(f"{seed:>4} | {deu.final_loss:>9.4f} | {100 * deu.test_acc:>11.1f}% | {100 * deu.zero_zone:>12.1f}% | "
              f"{relu.final_loss:>9.4f} | {100 * relu.test_acc:>12.1f}%")
    med = statistics.median
    print(f"median | {med(r[1].final_loss for r in rows):>9.4f} | {100 * med(r[1].test_acc for r in rows):>11.1f}% | "
          f"{'':>13} | {med(r[2].final_loss for r in rows):>9.4f} | {100 * med(r[2].test_acc for r in rows):>12.1f}%")
    print(f"\ntotal runtime: {time.perf_counter() - start:.1f} s")
    return rows


if __name__ == "__main__":
    main()
