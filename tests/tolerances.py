"""Per-dtype tolerances, kept in one place for every op's tests.

A backend's result in dtype ``d`` is compared with the float64 reference evaluated on the same
(``d``-rounded) inputs. ``atol`` is relative to the scale of the whole expected tensor (its max
magnitude, at least 1), since sums such as parameter gradients grow with the tensor, or of each slice
along ``scale_dim`` (DEU: each neuron's); ``rtol`` is elementwise. Measured worst cases that set
them: DEU fp32 vs float64 1.1e-5·(1 + |y|) (the float32 reference itself is as far off); fp16/bf16
are dominated by output rounding.
"""

from __future__ import annotations

import torch

TOL: dict[torch.dtype, tuple[float, float]] = {  # dtype: (atol, rtol)
    torch.float64: (1e-9, 1e-9),
    torch.float32: (5e-5, 1e-4),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1e-2, 3e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "",
                 scale_dim: int | None = None) -> None:
    """Assert ``|actual - expected| <= atol·max(1, max|expected|) + rtol·|expected|`` elementwise
    where ``expected`` is finite, and the same inf/NaN where it is not. ``scale_dim``: the max is taken per
    index along that axis (each neuron's own scale), not over the whole tensor, where a few large entries
    (DEU's outputs clamped at ±1000) would otherwise loosen the bound on every other slice."""
    atol, rtol = TOL[dtype]
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    finite = torch.isfinite(e)
    if not torch.equal(torch.isfinite(a), finite):
        i = int(torch.nonzero((torch.isfinite(a) != finite).flatten())[0])
        raise AssertionError(f"{what}: non-finite values differ; first at flat index {i}: "
                             f"got {a.flatten()[i].item()}, expected {e.flatten()[i].item()}")
    torch.testing.assert_close(a[~finite], e[~finite], rtol=0, atol=0, equal_nan=True, msg=f"{what}: inf/NaN differ")
    mag = torch.where(finite, e.abs(), 0.0)
    if scale_dim is None or not e.numel():
        scale = mag.max().clamp(min=1.0) if e.numel() else torch.tensor(1.0, dtype=e.dtype)
    else:
        d = scale_dim % e.ndim
        per = mag.movedim(d, 0).reshape(e.shape[d], -1).amax(1).clamp(min=1.0)
        scale = per.view([-1 if i == d else 1 for i in range(e.ndim)])
    err = torch.where(finite, (a - e).abs(), 0.0)
    bound = atol * scale + rtol * e.abs()
    bad = err > bound
    if bad.any():
        i = int(torch.nonzero(bad.flatten())[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{e.numel()} elements off; max err {err.max().item():.3e} "
            f"(scale there {scale.expand_as(e).flatten()[i].item():.3e}, dtype {dtype}); first at flat index {i}: "
            f"got {a.flatten()[i].item():.9g}, expected {e.flatten()[i].item():.9g}"
        )
