"""``kfuse.nn.DEU``: a learned per-neuron activation layer, and a training recipe for it.

The recipe (``examples/deu_digits.py``'s "DEU recipe" row; the measurements behind each choice are
in ``bench/results/2026-12-02-cpu-deu-paper.md``)::

    act = kfuse.nn.DEU(width, init="oscillator")              # exact gradient (the default)
    opt = torch.optim.Adam(kfuse.nn.deu_param_groups(model, lr=lr, coeff_lr=0.3 * lr))

Options:

- ``DEU(N, init=...)``: the coefficients' initial values (:data:`DEU_INITS`).

  - ``"paper"`` (default, unchanged): the papers' and the official code's ``a, b, c ~ U(0, 1)``,
    ``c1 = c2 = 0``. Most neurons start damped (``b > 0``), whose homogeneous parts grow like
    ``e^(|r|·|t|)`` for ``t < 0`` (up to the ``e^14`` cap, ``|r|`` up to ``b/a``), and ``1/c``
    scales the output up to 100×: the coefficients' gradient is heavy-tailed (digits, width 16:
    per-step max ``|grad|`` median 0.026, 99th percentile 40, max 3.6e4) and 10-24% of the
    (step, neuron) pairs sit in the zero band. On digits it trails ReLU by 1.8-10.5 points.
  - ``"oscillator"``: every neuron at ``(1, 0, 1, 0, 0)``, ``y = H(t)·(1 − cos t)``. ``b = 0`` is in
    the zero band, so with the exact gradient it stays there: the neurons keep the bounded
    ``c1 cos(w t) + c2 sin(w t) + H·(1 − cos(w t))/c`` family (hyperbolic when ``a·c`` turns
    negative), gradients light-tailed (width 16: median 0.0047, max 0.16). It ties ReLU at digits
    widths 16-64 and fits ``sin(3πx)`` with 4 neurons where tanh needs 8 and ReLU more than 32.
  - ``"first_order"`` ``(0, 1, 0.3, 0, 0)`` and ``"relu"`` ``(0, 1, 0, 0, 0)`` (the ramp case
    ``y = c1 + H(t)·t/b``, exactly ReLU): ReLU-like starts; ``"relu"`` trains as ReLU with the exact
    gradient (a and c never leave 0), and both collapse with ``"gravitation"`` (digits width 16:
    84% against 96%), whose gradients at ``a = ±0.01`` reach 1e5.

- ``DEU(N, degenerate_grad=...)``: ``"exact"`` (default) or ``"gravitation"``, the official code's
  gradient for coefficients inside the zero band ``|p| < 0.01`` (:func:`kfuse.deu`,
  :func:`kfuse.reference.deu.deu_gravitation_grad`). It cuts the time neurons spend in the band
  (digits, paper init, width 16: 14% → 4% of (step, neuron) pairs) but did not make the paper's
  training accurate (94.7 → 95.2% on validation) and costs a float64 reference pass over the
  degenerate neurons per step (digits width 64: 25 s instead of 1 s for 3 runs). Eager mode only.
- :func:`deu_param_groups`: optimizer parameter groups giving every DEU layer's ``coeffs`` their
  own learning rate and no weight decay (decay pulls a, b, c into the zero band, where the
  function changes case). ``coeff_lr = 0.3·lr`` beat ``1×`` and ``3×`` with the oscillator start.
- Gradient clipping: :func:`clip_deu_grad_norm_` clips the coefficients' gradient alone. With the
  paper's init (heavy tails) a max norm of 1 lifted digits width 4 from 76.7 ± 11.5 to
  89.1 ± 1.4% (validation) and changed widths 16-64 by under a point; with the oscillator start
  the tails are light and clipping changed nothing measurable, so the recipe leaves it out.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from kfuse import _backends, _checks
from kfuse.ops.deu import DEGENERATE_GRADS, deu
from kfuse.reference.deu import deu_init_coeffs

#: ``init`` values of :class:`DEU`: ``"paper"`` draws ``a, b, c ~ U(0, 1)``, ``c1 = c2 = 0``; the
#: others start every neuron at the row ``(a, b, c, c1, c2)`` given here.
DEU_INITS: dict[str, tuple[float, float, float, float, float] | None] = {
    "paper": None,
    "relu": (0.0, 1.0, 0.0, 0.0, 0.0),  # ramp: y = c1 + H·t/b, ReLU at the start
    "first_order": (0.0, 1.0, 0.3, 0.0, 0.0),  # y = H·(1 − e^(−0.3 t))/0.3: ReLU-like, saturates at 3.3
    "oscillator": (1.0, 0.0, 1.0, 0.0, 0.0),  # y = H·(1 − cos t): b = 0, a·c > 0
}


def init_deu_coeffs(num_features: int, init: str = "paper", generator: torch.Generator | None = None) -> Tensor:
    """``[num_features, 5]`` float32 initial coefficients for ``init`` (a key of :data:`DEU_INITS`)."""
    num_features = _checks.integer("init_deu_coeffs", "num_features", num_features, 1)  # (torch's errors before:
    # error-message hunt)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"init_deu_coeffs: generator must be a torch.Generator or None; got "
                        f"{_checks.type_name(generator)}")
    if init not in DEU_INITS:
        raise ValueError(f"DEU: init must be one of {list(DEU_INITS)}; got {init!r}")
    row = DEU_INITS[init]
    if row is None:
        return deu_init_coeffs(num_features, generator)
    return torch.tensor(row, dtype=torch.float32).repeat(num_features, 1)


class DEU(nn.Module):
    """Differential Equation Unit activations, one learned activation per neuron.

    Args:
        num_features: N, the size of the neuron axis.
        dim: the neuron axis of the input (``-1`` for ``[..., N]``, ``1`` for NCHW).
        backend: passed to :func:`kfuse.deu` (``"auto"`` by default).
        init: the coefficients' initialisation, a key of :data:`DEU_INITS` (``"paper"``: the
            paper's ``a, b, c ~ U(0, 1)``, ``c1 = c2 = 0``).
        degenerate_grad: ``"exact"`` (default) or ``"gravitation"`` (the official code's gradient
            for near-zero a, b, c; eager mode only), passed to :func:`kfuse.deu`.
        device, dtype: of ``coeffs`` (default: the CPU, float32).
    Shape:
        input ``[..., N, ...]`` with N at ``dim``; output the same.
    Parameters:
        coeffs: ``[N, 5]`` (float32 by default), one row ``(a, b, c, c1, c2)`` per neuron.
    """

    def __init__(self, num_features: int, dim: int = -1, backend: str = "auto", init: str = "paper",
                 degenerate_grad: str = "exact", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, v in (("num_features", num_features), ("dim", dim)):
            if isinstance(v, bool) or not hasattr(v, "__index__"):
                raise TypeError(f"DEU: {name} must be an int; got {type(v).__name__}")
        num_features, dim = operator.index(num_features), operator.index(dim)
        if num_features < 1:
            raise ValueError(f"DEU: num_features must be >= 1; got {num_features}")
        _backends.check_backend_name("DEU", backend)  # (a non-str was a ValueError: a TypeError, as the ops')
        if degenerate_grad not in DEGENERATE_GRADS:
            raise ValueError(f"DEU: degenerate_grad must be one of {list(DEGENERATE_GRADS)}; got {degenerate_grad!r}")
        self.num_features, self.dim, self.backend = num_features, dim, backend
        self.init, self.degenerate_grad = init, degenerate_grad
        # (device/dtype, as torch's modules take them: torch.nn.utils.skip_init refused the layer without them;
        # module-conventions hunt, 2026-12-07. The draw is init_deu_coeffs', float32, then converted.)
        self.coeffs = nn.Parameter(init_deu_coeffs(num_features, init).to(device=device, dtype=dtype))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Redraws ``coeffs`` from the layer's ``init`` (in place)."""
        self.coeffs.copy_(init_deu_coeffs(self.num_features, self.init))

    def forward(self, x: Tensor) -> Tensor:
        """``kfuse.deu(x, coeffs, dim, backend, degenerate_grad)``; ``x`` must have ``num_features``
        at ``dim``."""
        if isinstance(x, Tensor) and -x.ndim <= self.dim < x.ndim and x.shape[self.dim] != self.num_features:
            hint = " (NCHW feature maps need dim=1)" if self.dim == -1 and x.ndim == 4 else ""
            raise ValueError(f"DEU(num_features={self.num_features}, dim={self.dim}): the input of shape "
                             f"{tuple(x.shape)} has {x.shape[self.dim]} features at dim {self.dim}{hint}")
        return deu(x, self.coeffs, self.dim, self.backend, self.degenerate_grad)

    def extra_repr(self) -> str:
        extra = "" if self.init == "paper" else f", init={self.init!r}"
        extra += "" if self.degenerate_grad == "exact" else f", degenerate_grad={self.degenerate_grad!r}"
        return f"num_features={self.num_features}, dim={self.dim}, backend={self.backend!r}{extra}"


def deu_coeffs(model: nn.Module) -> list[nn.Parameter]:
    """The ``coeffs`` of every :class:`DEU` layer in ``model``, each once: the leaves an optimizer updates.
    For coefficients computed at every access, the parameters they are computed from: a
    ``torch.nn.utils.parametrize`` parametrization's ``original`` parameters, ``coeffs_orig`` of
    ``torch.nn.utils.prune``, ``coeffs_g`` and ``coeffs_v`` of the hook-based ``torch.nn.utils.weight_norm``
    (``module.coeffs`` is not a leaf then: the optimizer refused it, and clipping its gradient clipped
    nothing; module hunts, 2026-12-05 and 2026-12-07)."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if not isinstance(module, DEU):
            continue
        if torch.nn.utils.parametrize.is_parametrized(module, "coeffs"):
            leaves = list(module.parametrizations.coeffs.parameters(recurse=False))  # original, or original0..
        else:  # coeffs itself, or what prune / weight_norm hooks registered in its place (coeffs_orig, ...)
            leaves = [p for name, p in module._parameters.items() if p is not None and name.startswith("coeffs")]
        for p in leaves:
            seen.setdefault(id(p), p)
    return list(seen.values())


def deu_param_groups(model: nn.Module, lr: float, coeff_lr: float | None = None, weight_decay: float = 0.0,
                     coeff_weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups: every DEU layer's ``coeffs`` in one group, the rest in another.

    Each parameter of ``model`` (shared ones once) is in exactly one group; empty groups are left
    out. Pass the result to any ``torch.optim`` optimizer, e.g.
    ``torch.optim.Adam(deu_param_groups(model, lr=1e-2, coeff_lr=1e-2))``.

    Args:
        model: any module containing :class:`DEU` layers.
        lr: learning rate of the other parameters.
        coeff_lr: learning rate of the DEU coefficients (default: ``lr``).
        weight_decay: of the other parameters.
        coeff_weight_decay: of the coefficients; 0 by default, since decay pulls a, b, c towards
            the zero band ``|p| < 0.01`` where the closed form changes case (and, with the exact
            gradient, where a parameter the case does not use can never leave).
    Returns:
        ``[{"params": others, "lr": lr, "weight_decay": weight_decay, "name": "weights"},
        {"params": coeffs, "lr": coeff_lr, "weight_decay": coeff_weight_decay, "name": "deu_coeffs"}]``.
    """
    for name, v in (("lr", lr), ("weight_decay", weight_decay), ("coeff_weight_decay", coeff_weight_decay)) + (
            (("coeff_lr", coeff_lr),) if coeff_lr is not None else ()):
        if _checks.real("deu_param_groups", name, v, finite=True) < 0:  # (numpy floats too; 10**400: its name)
            raise ValueError(f"deu_param_groups: {name} must be a finite number >= 0; got {v!r}")
    coeffs = deu_coeffs(model)
    ids = {id(p) for p in coeffs}
    others: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        if id(p) not in ids:
            others.setdefault(id(p), p)
    groups = [
        {"params": list(others.values()), "lr": lr, "weight_decay": weight_decay, "name": "weights"},
        {"params": coeffs, "lr": lr if coeff_lr is None else coeff_lr, "weight_decay": coeff_weight_decay,
         "name": "deu_coeffs"},
    ]
    return [g for g in groups if g["params"]]


def clip_deu_grad_norm_(model: nn.Module | Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the DEU coefficients only (of a model, or the given
    parameters); returns their total gradient norm before clipping."""
    params = deu_coeffs(model) if isinstance(model, nn.Module) else list(model)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
