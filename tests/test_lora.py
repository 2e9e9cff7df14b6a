"""LoRA: the reference against the definition, every backend against the reference, the
modules, the routes (autograd, torch.compile, torch.library, transforms) and bad input."""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import sm90
import torch
from interrupts import interrupt_each_point
from tolerances import TOL, assert_close
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

import kfuse
from kfuse import _backends
from kfuse.bench import OPS
from kfuse.bench import lora as lora_bench
from kfuse.ops import lora as ops
from kfuse.ops.lora import backend_reasons, dropout_mask
from kfuse.reference.lora import lora_linear_multi_reference, lora_linear_reference
from kfuse.report import Ceilings
from kfuse.triton_kernels import lora as lk

HAS_CUDA = torch.cuda.is_available()

# (backend, device): the CPU backend (torch's BLAS calls); the Triton kernels under the
# interpreter on CPU tensors (tiny shapes) and compiled on the GPU. LoRA has no csrc kernels:
# the "cuda" backend always refuses (test_backend_choice), and "auto" on a GPU is Triton
# (test_auto_on_cuda_is_triton).
BACKENDS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", marks=pytest.mark.interpret, id="triton-interp"),
    pytest.param("triton", "cuda", marks=pytest.mark.cuda, id="triton-cuda"),
]
# opcheck/compile go through fake tensors, so any backend whose kernels run on the device.
OP_BACKENDS = [pytest.param("cpu", "cpu", id="cpu"), pytest.param("triton", "cuda", marks=pytest.mark.cuda,
                                                                  id="triton-cuda")]


def interp(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    if backend == "triton":  # no float64 kernels; the interpreter is wrong for bf16 on CPU
        return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    return [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def rng_state(device: str) -> Tensor:
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


class Inputs:
    """Random inputs of one LoRA layer, made in float64 and rounded to the test dtypes."""

    def __init__(self, lead: tuple[int, ...], K: int, N: int, r: int, dtype: torch.dtype, adapter_dtype: torch.dtype,
                 device: str, bias: bool = True, lora_bias: bool = True, fifo: bool = False) -> None:
        def rnd(*shape: int, scale: float = 1.0) -> Tensor:
            return torch.randn(*shape, dtype=torch.float64) * scale

        self.x = rnd(*lead, K).to(dtype=dtype, device=device)
        w = rnd(N, K, scale=max(K, 1) ** -0.5)
        self.weight = (w.t().contiguous() if fifo else w).to(dtype=dtype, device=device)
        self.A = rnd(r, K, scale=max(K, 1) ** -0.5).to(dtype=adapter_dtype, device=device)
        self.B = rnd(N, r, scale=r**-0.5).to(dtype=adapter_dtype, device=device)
        self.bias = rnd(N).to(dtype=dtype, device=device) if bias else None
        self.lora_bias = rnd(N).to(dtype=adapter_dtype, device=device) if lora_bias else None
        self.scaling, self.fifo = 0.75, fifo
        self.gy = rnd(*lead, N).to(dtype=dtype, device=device)

    def tensors(self) -> list[Tensor | None]:
        return [self.x, self.weight, self.A, self.B, self.bias, self.lora_bias]


def run(inp: Inputs, backend: str, grads_of: tuple[bool, ...], p: float = 0.0, double: bool = False,
        mask: Tensor | None = None) -> tuple[Tensor, list[Tensor | None]]:
    """y and the gradients of ``(y · gy).sum()`` for the inputs flagged in ``grads_of``, through
    kfuse (``double=False``) or through the float64 reference on the same values (with ``mask``)."""
    ts = [None if t is None else t.detach().clone() for t in inp.tensors()]
    if double:
        ts = [None if t is None else t.double() for t in ts]
    for t, g in zip(ts, grads_of, strict=True):
        if t is not None and g:
            t.requires_grad_()
    x, w, a, b, bias, lb = ts
    if double:
        y = lora_linear_reference(x, w, a, b, inp.scaling, bias, lb, mask=mask, dropout_p=p, fan_in_fan_out=inp.fifo)
    else:
        y = kfuse.lora_linear(x, w, a, b, inp.scaling, bias, lb, dropout_p=p, fan_in_fan_out=inp.fifo,
                              backend=backend)
    wanted = [t for t, g in zip(ts, grads_of, strict=True) if t is not None and g]
    grads = torch.autograd.grad(y, wanted, inp.gy.double() if double else inp.gy) if wanted else []
    it = iter(grads)
    out = [next(it) if t is not None and g else None for t, g in zip(ts, grads_of, strict=True)]
    return y.detach(), out


NAMES = ("dx", "dW", "dA", "dB", "dbias", "dlora_bias")


def compare(inp: Inputs, backend: str, grads_of: tuple[bool, ...], what: str, p: float = 0.0,
            mask: Tensor | None = None) -> None:
    """kfuse vs the float64 reference on the same rounded inputs, each result in its input's
    dtype, at x's dtype's tolerance (fp32 accumulations of half-precision products) or at the
    result's own where that is coarser (fp32 adapters' gradients with a float64 x)."""
    y, grads = run(inp, backend, grads_of, p)
    y_ref, grads_ref = run(inp, backend, grads_of, p, double=True, mask=mask)
    assert y.dtype == inp.x.dtype and y.shape == y_ref.shape
    dtype = inp.x.dtype
    assert_close(y, y_ref, dtype, f"y {what}")
    for name, g, gr, t in zip(NAMES, grads, grads_ref, inp.tensors(), strict=True):
        if gr is None:
            assert g is None, f"{name} {what}: a gradient for an input that needs none"
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, f"{name} {what}: {g.dtype} {tuple(g.shape)}"
        assert_close(g, gr, max(dtype, g.dtype, key=lambda d: TOL[d]), f"{name} {what}")


# ---------------------------------------------------------------- the reference vs the definition


def test_reference_is_the_definition(seed: int) -> None:
    """The reference computes y = x Wᵀ + bias + s·((dropout(x) Aᵀ) Bᵀ + lora_bias) as PEFT's
    lora.Linear does (nn.Linear base, dropout on the LoRA input, fp32 adapters), in both weight
    layouts, and returns x's dtype."""
    x, w = torch.randn(2, 3, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    A, B = torch.randn(4, 10, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    bias, lb = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    mask = torch.rand(6, 10) >= 0.25
    xd = x * mask.view(2, 3, 10) / 0.75
    want = torch.nn.functional.linear(x, w, bias) + 0.5 * (torch.nn.functional.linear(xd, A) @ B.t() + lb)
    got = lora_linear_reference(x, w, A, B, 0.5, bias, lb, mask=mask, dropout_p=0.25)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(lora_linear_reference(x, w.t(), A, B, 0.5, bias, lb, mask=mask, dropout_p=0.25,
                                                     fan_in_fan_out=True), want)
    half = lora_linear_reference(x.half(), w.half(), A.float(), B.float(), 0.5)
    assert half.dtype == torch.float16
    ref32 = lora_linear_reference(x.half().float(), w.half().float(), A.float(), B.float(), 0.5)
    torch.testing.assert_close(half, ref32.half())


def test_multi_reference_is_the_definition(seed: int) -> None:
    """Row by row, with the true ranks' slices; padding (NaN here) is never read; ids outside
    [0, L) are the base model."""
    x, w = torch.randn(7, 9, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    ranks = torch.tensor([2, 4, 0])
    A, B = torch.full((3, 4, 9), math.nan, dtype=torch.float64), torch.full((3, 5, 4), math.nan, dtype=torch.float64)
    for a, r in enumerate(ranks.tolist()):
        A[a, :r], B[a, :, :r] = torch.randn(r, 9), torch.randn(5, r)
    s = torch.tensor([0.5, 2.0, 3.0])
    ids = torch.tensor([0, -1, 1, 2, 1, 0, 5])
    got = lora_linear_multi_reference(x, w, A, B, s, ranks, ids)
    for m, a in enumerate(ids.tolist()):
        want = x[m] @ w.t()
        if 0 <= a < 3 and ranks[a] > 0:
            r = ranks[a]
            want = want + s[a] * ((x[m] @ A[a, :r].t()) @ B[a, :, :r].t())
        torch.testing.assert_close(got[m], want)


# ---------------------------------------------------------------- every backend vs the reference

# (leading dims, K, N, r, bias, lora_bias, fan_in_fan_out, W trainable): odd sizes, r in
# {1, 8, 16, 64, 128}, 3-D inputs, both layouts, with and without biases, an empty batch.
CASES = [
    ((13,), 37, 29, 1, True, False, False, False),
    ((2, 7), 33, 45, 8, False, True, True, True),
    ((11,), 70, 19, 16, True, True, False, True),
    ((5,), 130, 67, 64, False, False, True, False),
    ((3, 3), 129, 131, 128, True, True, True, False),
    ((0,), 9, 7, 4, True, True, False, True),
    ((4,), 24, 24, 4, True, True, True, True),  # square [K, N] W, trainable: a missing transpose fits (GPT-2's c_proj)
]
# The interpreter runs every tile in numpy: smaller sizes, still several tiles and odd edges.
INTERP_CASES = [
    ((13,), 37, 29, 1, True, False, False, False),
    ((2, 7), 33, 45, 8, False, True, True, True),
    ((9,), 21, 19, 16, True, True, False, True),
    ((3,), 40, 17, 64, False, False, True, False),
    ((2, 2), 18, 23, 128, True, True, True, False),
    ((0,), 9, 7, 4, True, True, False, True),
    ((4,), 24, 24, 4, True, True, True, True),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_forward_and_gradients(backend: str, device: str, case: int, seed: int) -> None:
    lead, K, N, r, bias, lora_bias, fifo, w_grad = (INTERP_CASES if interp(backend, device) else CASES)[case]
    for dtype in dtypes_for(backend, device):
        for adapter_dtype in dict.fromkeys((torch.float32, dtype)):
            inp = Inputs(lead, K, N, r, dtype, adapter_dtype, device, bias, lora_bias, fifo)
            what = f"{backend} {dtype} adapters {adapter_dtype} case {case}"
            compare(inp, backend, (True, w_grad, True, True, True, True), what)
    # Only some inputs need gradients (frozen adapters, x a leaf without grad): the others are None.
    inp = Inputs(lead, K, N, r, torch.float32, torch.float32, device, bias, lora_bias, fifo)
    compare(inp, backend, (False, False, True, False, False, True), f"{backend} dA only")
    compare(inp, backend, (True, False, False, False, False, False), f"{backend} dx only")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("path", ["eager", "registered"])
def test_the_backward_keeps_only_what_the_gradients_asked_for_need(backend: str, device: str, path: str,
                                                                   seed: int) -> None:
    """x (M × K) is kept for dA and dW only, S (M × r) for dB only: both were saved whatever was asked, so a
    frozen layer trained through (dx only) or BitFit (biases only) kept x alive where torch's linear frees it
    (modes-and-hooks hunt, 2026-12-07). Checked through saved_tensors_hooks, with the gradients against the
    float64 reference, dropout on (the mask is regenerated for dx from the seed)."""
    lead, K, N, r, p = (3, 5), 12, 10, 4, 0.25
    M = math.prod(lead)
    inp = Inputs(lead, K, N, r, torch.float32, torch.float32, device)
    for grads_of, keeps_x, keeps_s in (((True, False, False, False, False, False), False, False),
                                       ((False, False, False, False, True, True), False, False),
                                       ((True, False, False, True, False, False), False, True),
                                       ((False, False, True, False, False, False), True, False),
                                       ((False, True, False, False, False, False), True, False),
                                       ((True, True, True, True, True, True), True, True)):
        saved: list[Tensor] = []
        ts = [None if t is None else t.detach().clone().requires_grad_(g) for t, g in zip(inp.tensors(), grads_of,
                                                                                          strict=True)]
        x, w, a, b, bias, lb = ts
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            if path == "eager":
                y = kfuse.lora_linear(x, w, a, b, inp.scaling, bias, lb, dropout_p=p, backend=backend)
            else:
                y = torch.ops.kfuse.lora_forward(x, w, a, b, inp.scaling, bias, lb, p, False, backend)[0]
        shapes = [tuple(t.shape) for t in saved]
        assert ((M, K) in shapes or (*lead, K) in shapes) == keeps_x, (grads_of, shapes)
        assert ((M, r) in shapes) == keeps_s, (grads_of, shapes)
        got = torch.autograd.grad(y, [t for t, g in zip(ts, grads_of, strict=True) if g], inp.gy)
        (seed_t,) = [t for t in saved if t.dtype == torch.int64]
        _, want = run(inp, backend, grads_of, p, double=True, mask=dropout_mask(seed_t, M, K, p, backend))
        for g, gr in zip(got, [t for t in want if t is not None], strict=True):
            assert_close(g, gr, torch.float32, f"{grads_of}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_flop_counter_counts_the_fused_gemms(backend: str, device: str, seed: int) -> None:
    """torch.utils.flop_counter.FlopCounterMode counted 0 FLOPs for kfuse's LoRA ops, so a fused model's FLOPs
    (and MFU) lost its LoRA layers (modes-and-hooks hunt, 2026-12-07). Forward and backward count what the
    same product written with torch's matmuls counts; the multi-adapter forward counts each row's own rank."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    inp = Inputs((3, 5), 12, 10, 4, torch.float32, torch.float32, device, bias=False, lora_bias=False)
    for grads_of in ((True, False, True, True, False, False), (False, True, False, False, False, False),
                     (True, True, True, True, False, False)):
        counts = []
        for how in ("kfuse", "torch"):
            x, w, a, b = (t.detach().clone().requires_grad_(g) for t, g in zip(inp.tensors()[:4], grads_of,
                                                                               strict=False))
            with FlopCounterMode(display=False) as mode:
                y = (kfuse.lora_linear(x, w, a, b, inp.scaling, backend=backend) if how == "kfuse"
                     else x @ w.t() + inp.scaling * ((x @ a.t()) @ b.t()))
                y.backward(inp.gy)
            counts.append(mode.get_total_flops())
        assert counts[0] == counts[1] > 0, (grads_of, counts)
    K, N, L, r_max = 12, 10, 3, 4
    ranks = torch.tensor([4, 1, 2], dtype=torch.int32, device=device)
    ids = torch.tensor([2, -1, 0, 2, 1], device=device)
    with FlopCounterMode(display=False) as mode:
        kfuse.lora_linear_multi(torch.randn(5, K, device=device), torch.randn(N, K, device=device),
                                torch.randn(L, r_max, K, device=device), torch.randn(L, N, r_max, device=device),
                                torch.ones(L, device=device), ranks, ids, backend=backend)
    assert mode.get_total_flops() == 2 * 5 * N * K + 2 * (K + N) * (2 + 4 + 2 + 1)


def test_flop_formulas_register_whichever_is_imported_first() -> None:
    """The formulas wait for torch.utils.flop_counter (~175 ms to import, more than kfuse's own import: not
    imported by kfuse): registered when it is imported after kfuse, or at once when it was imported before."""
    script = """
import sys, torch
{first}
{second}
print(int("torch.utils.flop_counter" in sys.modules))
from torch.utils.flop_counter import FlopCounterMode
x, w, a, b = torch.randn(2, 8), torch.randn(6, 8), torch.randn(3, 8), torch.randn(6, 3)
with FlopCounterMode(display=False) as mode:
    kfuse.lora_linear(x, w, a, b, 1.0)
print(mode.get_total_flops())
"""
    kfuse_import, counter_import = "import kfuse", "import torch.utils.flop_counter"
    for first, second, loaded in ((kfuse_import, "", "0"), (counter_import, kfuse_import, "1")):
        out = subprocess.run([sys.executable, "-c", script.format(first=first, second=second)], capture_output=True,
                             text=True, timeout=300, check=True).stdout.split()
        assert out == [loaded, str(2 * 2 * 6 * 8 + 2 * 2 * 8 * 3 + 2 * 2 * 3 * 6)], (first, out)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dropout(backend: str, device: str, seed: int) -> None:
    """Masks from torch's RNG: the right keep rate, different across rows, reproducible under
    torch.manual_seed (grad and no-grad paths alike), and the gradients use the forward's mask
    (the reference fed the backend's own mask gives the same y and gradients). No dropout in
    evaluation, and then the RNG is not advanced."""
    lead, K, N, r = ((4, 9), 40, 24, 8) if interp(backend, device) else ((8, 16), 96, 40, 8)
    p = 0.3
    M = math.prod(lead)
    inp = Inputs(lead, K, N, r, torch.float32, torch.float32, device, fifo=True)
    saved: list[Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(1234)
        y, grads = run(inp, backend, (True, True, True, True, True, True), p)
    seeds = [t for t in saved if t.dtype == torch.int64]
    assert len(seeds) == 1 and seeds[0].shape == (1,) and seeds[0].device.type == device
    mask = dropout_mask(seeds[0], M, K, p, backend)
    assert mask.shape == (M, K) and mask.dtype == torch.bool
    keep = mask.double().mean().item()
    assert abs(keep - (1 - p)) < 5 * math.sqrt(p * (1 - p) / (M * K)), keep
    assert not (mask == mask[:1]).all(), "every row got the same mask"
    assert torch.equal(dropout_mask(seeds[0], M, K, p, backend), mask), "the mask is a function of the seed"
    torch.manual_seed(1234)  # compare() runs kfuse first: the same seed, the same mask
    compare(inp, backend, (True, True, True, True, True, True), f"{backend} dropout", p=p, mask=mask)

    torch.manual_seed(1234)
    y2, grads2 = run(inp, backend, (True, True, True, True, True, True), p)
    assert torch.equal(y, y2)
    for g, g2 in zip(grads, grads2, strict=True):
        assert torch.equal(g, g2), "gradients must be reproducible"
    with torch.no_grad():
        torch.manual_seed(1234)
        y3 = kfuse.lora_linear(*inp.tensors()[:4], inp.scaling, *inp.tensors()[4:], dropout_p=p,
                               fan_in_fan_out=True, backend=backend)
    assert torch.equal(y, y3), "the no-grad path draws the same mask"
    torch.manual_seed(4321)
    assert not torch.equal(run(inp, backend, (False,) * 6, p)[0], y)

    state = rng_state(device)
    args = (*inp.tensors()[:4], inp.scaling, *inp.tensors()[4:])
    y_eval = kfuse.lora_linear(*args, dropout_p=p, training=False, fan_in_fan_out=True, backend=backend)
    assert torch.equal(rng_state(device), state), "no RNG draw without dropout"
    assert torch.equal(y_eval, kfuse.lora_linear(*args, dropout_p=0.0, fan_in_fan_out=True, backend=backend))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_dropout_mask_does_not_depend_on_the_default_dtype(backend: str, seed: int) -> None:
    """The mask is drawn in float32 whatever torch's default dtype: a float64 default drew another mask
    (and a backward run under another default than its forward regenerated a different one: wrong
    gradients), a bfloat16 default rounded p and the draws (the kept fraction off by 16% at p = 0.99;
    globals hunt). y and the gradients are those of the float32 default, also with the backward run
    under another default."""
    inp = Inputs((6,), 24, 16, 4, torch.float32, torch.float32, "cpu")

    def step(forward_default: torch.dtype, backward_default: torch.dtype) -> list[Tensor]:
        x, w, a, b = (t.detach().clone().requires_grad_(t is not inp.weight) for t in inp.tensors()[:4])
        old = torch.get_default_dtype()
        try:
            torch.set_default_dtype(forward_default)
            torch.manual_seed(seed)
            y = kfuse.lora_linear(x, w, a, b, inp.scaling, dropout_p=0.5, backend=backend)
            torch.set_default_dtype(backward_default)
            (y * inp.gy).sum().backward()
        finally:
            torch.set_default_dtype(old)
        return [y.detach(), x.grad, a.grad, b.grad]

    expect = step(torch.float32, torch.float32)
    for fwd, bwd in ((torch.float64, torch.float64), (torch.float64, torch.float32), (torch.bfloat16, torch.float32)):
        for got, want in zip(step(fwd, bwd), expect, strict=True):
            assert torch.equal(got, want), (fwd, bwd)
    generator_seed = torch.tensor([seed])
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.bfloat16)
        mask = dropout_mask(generator_seed, 64, 64, 0.99, "cpu")
    finally:
        torch.set_default_dtype(old)
    assert torch.equal(mask, dropout_mask(generator_seed, 64, 64, 0.99, "cpu"))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dropout_keeps_nan_and_inf_of_dropped_elements(backend: str, device: str, seed: int) -> None:
    """Dropout is a product, as torch's (PEFT's, the reference's): a dropped inf or NaN of x gives NaN
    (0·inf), not 0, in y and in dA; the cpu and Triton backends selected 0 for dropped elements (numerics
    hunt). The NaN pattern is the float64 product's, with the backend's own mask."""
    M, K, N, r, p = 16, 12, 8, 2, 0.5
    inp = Inputs((M,), K, N, r, torch.float32, torch.float32, device)
    x = inp.x.detach().clone()
    x[:, 0] = float("inf")
    x[3, 5] = float("nan")
    a = inp.A.detach().clone().requires_grad_()
    saved: list[Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(seed)
        y = kfuse.lora_linear(x, inp.weight, a, inp.B, inp.scaling, dropout_p=p, backend=backend)
    (y * inp.gy).sum().backward()
    (seed_t,) = [t for t in saved if t.dtype == torch.int64]
    keep = dropout_mask(seed_t, M, K, p, backend).cpu().double()
    xd = x.cpu().double() * keep / (1 - p)
    A, B, W, gy = (t.detach().cpu().double() for t in (inp.A, inp.B, inp.weight, inp.gy))
    expect_y = x.cpu().double() @ W.t() + inp.scaling * (xd @ A.t()) @ B.t()
    expect_da = inp.scaling * (gy @ B).t() @ xd
    assert not keep[:, 0].all() and keep[:, 0].any()
    assert torch.equal(y.isnan().cpu(), expect_y.isnan()) and y.isnan().any()
    assert torch.equal(a.grad.isnan().cpu(), expect_da.isnan()) and a.grad.isnan().all(dim=0)[0]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_dropout_under_activation_checkpointing(backend: str, device: str, reentrant: bool, seed: int) -> None:
    """torch.utils.checkpoint (gradient checkpointing, as PEFT training enables it) recomputes the forward
    in the backward with the RNG state restored: the recomputation draws the same mask, so y and every
    gradient are the bits of the call without checkpointing."""
    lead, K, N, r = ((3, 5), 24, 16, 4) if interp(backend, device) else ((4, 9), 40, 24, 8)
    inp = Inputs(lead, K, N, r, torch.float32, torch.float32, device)

    def step(checkpointed: bool) -> tuple[Tensor, list[Tensor]]:
        x, w, a, b = (t.detach().clone().requires_grad_(t is not inp.weight) for t in inp.tensors()[:4])
        f = functools.partial(kfuse.lora_linear, scaling=inp.scaling, dropout_p=0.3, backend=backend)
        torch.manual_seed(seed)
        y = (torch.utils.checkpoint.checkpoint(f, x, w, a, b, use_reentrant=reentrant) if checkpointed
             else f(x, w, a, b))
        (y * inp.gy).sum().backward()
        return y.detach(), [x.grad, a.grad, b.grad]

    y, grads = step(False)
    y_ckpt, grads_ckpt = step(True)
    assert torch.equal(y_ckpt, y)
    for g, g_ckpt in zip(grads, grads_ckpt, strict=True):
        assert torch.equal(g_ckpt, g)


def test_reference_backend_dropout(seed: int) -> None:
    inp = Inputs((6,), 30, 10, 4, torch.float32, torch.float32, "cpu")
    args = (*inp.tensors()[:4], inp.scaling, *inp.tensors()[4:])
    torch.manual_seed(5)
    y = kfuse.lora_linear(*args, dropout_p=0.5, backend="reference")
    torch.manual_seed(5)
    assert torch.equal(y, kfuse.lora_linear(*args, dropout_p=0.5, backend="reference"))
    assert not torch.equal(y, kfuse.lora_linear(*args, dropout_p=0.0, backend="reference"))


@pytest.mark.parametrize("via", ["lora_linear", "torch.ops"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_saved_tensors(backend: str, device: str, via: str, seed: int) -> None:
    """Saved for the backward: x itself (no copy), S [M, r] fp32 and the seed, besides the
    parameters W, A, B; no other M×K or M×N tensor (not the mask, not y, not dropout(x))."""
    lead, K, N, r = (3, 5), 24, 20, 4
    M = math.prod(lead)
    inp = Inputs(lead, K, N, r, torch.float16, torch.float32, device)
    x, w, a, b, bias, lb = (t.detach().clone() for t in inp.tensors())
    for t in (x, a, b, bias, lb):
        t.requires_grad_()
    saved: list[Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        if via == "lora_linear":
            y = kfuse.lora_linear(x, w, a, b, 0.5, bias, lb, dropout_p=0.2, backend=backend)
        else:
            y = torch.ops.kfuse.lora_forward(x, w, a, b, 0.5, bias, lb, 0.2, False, backend)[0]
    y.float().sum().backward()
    params = {t.data_ptr() for t in (w, a, b)}
    rest = [t for t in saved if t.data_ptr() not in params or t.numel() == 0]
    kinds = sorted((str(t.dtype), tuple(t.shape)) for t in rest)
    x_like = [t for t in rest if t.dtype == torch.float16]
    assert len(rest) == 3, kinds
    assert len(x_like) == 1 and x_like[0].data_ptr() == x.data_ptr() and x_like[0].numel() == x.numel(), kinds
    assert [(t.dtype, tuple(t.shape)) for t in rest if t.dtype == torch.float32] == [(torch.float32, (M, r))], kinds
    assert [(t.dtype, tuple(t.shape)) for t in rest if t.dtype == torch.int64] == [(torch.int64, (1,))], kinds
    assert len([t for t in saved if t.data_ptr() in params]) == 3


@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck_float64(backend: str, p: float, fifo: bool, seed: int) -> None:
    """gradcheck of every input (W too), with dropout: the seed is reset before each call, so
    each evaluation draws the same mask and the backward must regenerate it. gradgradcheck:
    create_graph=True runs the reference's vjp with the backend's mask."""
    for K, N in ((5, 4), (4, 4)):  # and a square W, where a transposed dW of either layout would fit
        inp = Inputs((2, 3), K, N, 3, torch.float64, torch.float64, "cpu", fifo=fifo)
        ts = [t.detach().clone().requires_grad_() for t in inp.tensors()]

        def f(x: Tensor, w: Tensor, a: Tensor, b: Tensor, bias: Tensor, lb: Tensor) -> Tensor:
            torch.manual_seed(7)
            return kfuse.lora_linear(x, w, a, b, 0.6, bias, lb, dropout_p=p, fan_in_fan_out=fifo, backend=backend)

        assert torch.autograd.gradcheck(f, ts)
        if not fifo:
            assert torch.autograd.gradgradcheck(f, ts)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_batched_backward_with_dropout(backend: str, seed: int) -> None:
    """A batched backward (is_grads_batched: jacobians, vectorised) with dropout gives the row-by-row
    gradients: the backward regenerates the forward's mask inside autograd's vmap mode, which refuses
    random ops (it raised on the cpu backend)."""
    x = torch.randn(3, 6, requires_grad=True)
    W, A, B = torch.randn(4, 6), torch.randn(2, 6, requires_grad=True), torch.randn(4, 2)
    y = kfuse.lora_linear(x, W, A, B, 0.9, dropout_p=0.5, backend=backend)
    eye = torch.eye(y.numel()).view(-1, *y.shape)
    batched = torch.autograd.grad(y, (x, A), eye, is_grads_batched=True, retain_graph=True)
    rows = [torch.stack(g) for g in zip(*(torch.autograd.grad(y, (x, A), e, retain_graph=True) for e in eye),
                                        strict=True)]
    for b, r in zip(batched, rows, strict=True):
        assert_close(b, r, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic_and_inplace_output(backend: str, device: str, seed: int) -> None:
    """Gradients are bitwise reproducible; y of a 3-D input may be modified in place (it is no
    view made inside the autograd.Function); nothing needing a gradient records no node."""
    inp = Inputs((3, 4), 20, 12, 4, torch.float32, torch.float32, device)
    g1 = run(inp, backend, (True, False, True, True, True, True))[1]
    g2 = run(inp, backend, (True, False, True, True, True, True))[1]
    for a, b in zip(g1, g2, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    x = inp.x.clone().requires_grad_()
    y = kfuse.lora_linear(x, inp.weight, inp.A, inp.B, 0.5, backend=backend)
    assert "EagerLoRA" in type(y.grad_fn.next_functions[0][0]).__name__
    y += 1.0
    (gx,) = torch.autograd.grad(y.sum(), x)
    want = torch.autograd.grad(lora_linear_reference(x, inp.weight, inp.A, inp.B, 0.5).sum(), x)[0]
    assert_close(gx, want, torch.float32, "dx after y += 1")
    assert kfuse.lora_linear(inp.x, inp.weight, inp.A, inp.B, 0.5, backend=backend).grad_fn is None


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_features(backend: str, device: str, seed: int) -> None:
    """K = 0 (an empty input row): y is the biases, the gradients are zeros of the right shapes."""
    inp = Inputs((2, 3), 0, 5, 2, torch.float32, torch.float32, device)
    compare(inp, backend, (True, False, True, True, True, True), f"{backend} K = 0")
    y = kfuse.lora_linear(inp.x, inp.weight, inp.A, inp.B, 0.5, inp.bias, inp.lora_bias, backend=backend)
    torch.testing.assert_close(y, (inp.bias + 0.5 * inp.lora_bias).expand(2, 3, 5))


# ---------------------------------------------------------------- multi-adapter batches


def multi_inputs(lead: tuple[int, ...], K: int, N: int, ranks: list[int], dtype: torch.dtype,
                 adapter_dtype: torch.dtype, device: str, fifo: bool) -> dict[str, Tensor]:
    L, r_max = len(ranks), max(ranks)
    # Garbage past each rank (NaN, inf, huge): it must never be read.
    garbage = torch.tensor([math.nan, math.inf, -1e30], dtype=torch.float64)
    A = garbage[torch.randint(0, 3, (L, r_max, K))]
    B = garbage[torch.randint(0, 3, (L, N, r_max))]
    for a, r in enumerate(ranks):
        A[a, :r] = torch.randn(r, K, dtype=torch.float64) * K**-0.5
        B[a, :, :r] = torch.randn(N, r, dtype=torch.float64) * max(r, 1) ** -0.5
    w = torch.randn(N, K, dtype=torch.float64) * K**-0.5
    M = math.prod(lead)
    ids = torch.randint(-1, L, (M,))
    ids[:L + 1] = torch.arange(-1, L)  # every adapter and the base at least once
    ids = ids[torch.randperm(M)].view(lead)
    return {
        "x": torch.randn(*lead, K, dtype=torch.float64).to(dtype=dtype, device=device),
        "weight": (w.t().contiguous() if fifo else w).to(dtype=dtype, device=device),
        "A_stack": A.to(dtype=adapter_dtype, device=device), "B_stack": B.to(dtype=adapter_dtype, device=device),
        "scalings": torch.rand(L, device=device) + 0.5,
        "ranks": torch.tensor(ranks, dtype=torch.int32, device=device),
        "adapter_ids": ids.to(device),
        "bias": torch.randn(N, dtype=torch.float64).to(dtype=dtype, device=device),
    }


def multi_rows(t: dict[str, Tensor], fifo: bool) -> Tensor:
    """The float64 definition, row by row with each adapter's true slices."""
    x = t["x"].double().reshape(-1, t["x"].shape[-1])
    w = t["weight"].double()
    y = x @ (w if fifo else w.t()) + t["bias"].double()
    rows = []
    for m, a in enumerate(t["adapter_ids"].reshape(-1).tolist()):
        row = y[m]
        r = int(t["ranks"][a]) if a >= 0 else 0
        if r:
            A, B = t["A_stack"][a, :r].double(), t["B_stack"][a, :, :r].double()
            row = row + float(t["scalings"][a]) * ((x[m] @ A.t()) @ B.t())
        rows.append(row)
    return torch.stack(rows).view(*t["x"].shape[:-1], -1)


@pytest.mark.parametrize("backend,device", [*BACKENDS, pytest.param("reference", "cpu", id="reference")])
def test_multi_adapter(backend: str, device: str, seed: int) -> None:
    """Rows with different adapters (ranks 1, 8, 5 and 0 padded to 8; garbage in the padding),
    base-only rows (-1), 3-D input with ids of x.shape[:-1] or flattened, both layouts."""
    lead, K, N = ((3, 5), 21, 19) if interp(backend, device) else ((5, 7), 45, 37)
    dtypes = dtypes_for("cpu" if backend == "reference" else backend, device)
    for dtype in dtypes:
        for adapter_dtype in dict.fromkeys((torch.float32, dtype)):
            for fifo in (False, True):
                t = multi_inputs(lead, K, N, [1, 8, 5, 0], dtype, adapter_dtype, device, fifo)
                with torch.no_grad():
                    y = kfuse.lora_linear_multi(**t, fan_in_fan_out=fifo, backend=backend)
                assert y.dtype == dtype and y.shape == (*lead, N)
                assert_close(y, multi_rows(t, fifo), dtype, f"{backend} {dtype} {adapter_dtype} fifo={fifo}")
    t = multi_inputs(lead, K, N, [3, 2], torch.float32, torch.float32, device, False)
    t["bias"] = None
    flat = dict(t, adapter_ids=t["adapter_ids"].reshape(-1))
    with torch.no_grad():
        assert torch.equal(kfuse.lora_linear_multi(**flat, backend=backend),
                           kfuse.lora_linear_multi(**t, backend=backend))
        empty = dict(t, x=t["x"][:0], adapter_ids=t["adapter_ids"][:0])
        assert kfuse.lora_linear_multi(**empty, backend=backend).shape == (0, *lead[1:], N)
        # A rank-0 adapter adds s·0: NaN for a NaN scaling on every backend (the cpu one skipped it; numerics hunt).
        zero = dict(t, ranks=torch.tensor([3, 0], dtype=t["ranks"].dtype, device=device),
                    scalings=torch.tensor([0.5, float("nan")], device=device))
        ids = zero["adapter_ids"].reshape(-1)
        assert torch.equal(kfuse.lora_linear_multi(**zero, backend=backend).reshape(ids.numel(), -1).isnan().all(1),
                           ids == 1) and (ids == 1).any()


def _neg_view(t: Tensor) -> Tensor:
    """``t``'s values in a lazily negated view of ``-t`` (the negative bit set; ``.contiguous()`` keeps it)."""
    return torch._neg_view(-t)


@pytest.mark.parametrize("backend,device", [*BACKENDS, pytest.param("reference", "cpu", id="reference")])
def test_negated_views_are_read_as_their_values(backend: str, device: str) -> None:
    """A ``torch._neg_view`` in any floating argument of the single- and multi-adapter ops, or as the
    gradient, gives the plain tensors' results bit for bit (the Triton multi-adapter forward read
    scalings' memory, ``-scalings``: layout hunt, 2026-12-05)."""
    torch.manual_seed(0)
    t = multi_inputs((5,), 21, 19, [3, 2], torch.float32, torch.float32, device, False)
    with torch.no_grad():
        y = kfuse.lora_linear_multi(**t, backend=backend)
        for name in ("x", "weight", "A_stack", "B_stack", "scalings", "bias"):
            got = kfuse.lora_linear_multi(**dict(t, **{name: _neg_view(t[name])}), backend=backend)
            assert torch.equal(got, y), name
    x = torch.randn(5, 21, device=device, requires_grad=True)
    w = torch.randn(19, 21, device=device)
    A = torch.randn(4, 21, device=device, requires_grad=True)
    B = torch.randn(19, 4, device=device, requires_grad=True)
    g = torch.randn(5, 19, device=device)
    grads = []
    for grad in (g, _neg_view(g)):
        y = kfuse.lora_linear(x, w, A, B, 0.5, backend=backend)
        grads.append(torch.autograd.grad(y, (x, A, B), grad))
    for a, b, name in zip(*grads, ("x", "A", "B"), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_negated_x_with_dropout(backend: str, device: str, dtype: torch.dtype) -> None:
    """A lazily negated x (contiguous) with dropout gives the plain x's output and gradients, bit for bit: the
    cpu backend's dropout product read x's memory, -x (y 31 off; layout hunt, 2026-12-07)."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take no float64")
    torch.manual_seed(0)
    x = torch.randn(4, 24, device=device, dtype=dtype)
    w = torch.randn(5, 24, device=device, dtype=dtype)
    A = torch.randn(2, 24, device=device, requires_grad=True)
    B = torch.randn(5, 2, device=device, requires_grad=True)
    g = torch.randn(4, 5, device=device, dtype=dtype)
    got = []
    for xi in (x, _neg_view(x)):
        torch.manual_seed(1)
        y = kfuse.lora_linear(xi, w, A, B, 0.5, dropout_p=0.5, backend=backend)
        got.append((y, *torch.autograd.grad(y, (A, B), g)))
    for a, b, name in zip(*got, ("y", "A", "B"), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_backend_does_not_cast_the_weight(dtype: torch.dtype, seed: int) -> None:
    """The cpu backend cast W to float32 on every call (forward and dx): at decode sizes that cost more than
    torch's whole half GEMM (4-10x torch's half x Wᵀ at M = 1..16; perf hunt, 2026-12-04), and above 32
    rows, where it stayed, a temporary fp32 copy of W (twice a bf16 W's size; memory hunt, 2026-12-06) and,
    on CPUs with bf16 arithmetic, 3-11x PEFT's time. The base GEMM runs in half at every M (the profiler
    sees no copy of W's shape). Values within the dtype's tolerance."""
    K, N = 64, 48

    def casts_of_w(M: int) -> int:
        x, w, a, b = torch.randn(M, K), torch.randn(N, K), torch.randn(4, K), torch.randn(N, 4)
        x, w = x.to(dtype).requires_grad_(), w.to(dtype)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            y = kfuse.lora_linear(x, w, a, b, 0.5, backend="cpu")
            (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        xd = x.detach().double()
        want = xd @ w.double().t() + 0.5 * (xd @ a.double().t()) @ b.double().t()
        assert_close(y, want, dtype, f"y M={M}")
        assert_close(gx, (torch.ones(M, N, dtype=torch.float64) @ (w.double() + 0.5 * b.double() @ a.double())),
                     dtype, f"grad x M={M}")
        return sum(e.name == "aten::_to_copy" and list(e.input_shapes[0]) in ([N, K], [K, N])
                   for e in prof.events())
    for M in (1, 32, 33, 300):
        assert casts_of_w(M) == 0, M


def test_cpu_half_products_past_the_half_range_keep_their_fp32_sums() -> None:
    """The cpu backend runs its base GEMM in half: x Wᵀ = 80000 rounded to inf,
    where its fp32 sum with the bias (or with the LoRA term) is finite and the other backends give it
    (numerical hunt). Those products run in fp32."""
    x = torch.full((2, 4), 200.0, dtype=torch.float16)
    w = torch.full((3, 4), 100.0, dtype=torch.float16)
    A, B = torch.ones(1, 4), torch.full((3, 1), -40.0)  # s·(x Aᵀ) Bᵀ = -32000
    bias = torch.full((3,), -30000.0, dtype=torch.float16)
    for args in ((A, B * 0, 1.0, bias), (A, B, 1.0, None)):
        got = kfuse.lora_linear(x, w, *args[:3], bias=args[3], backend="cpu")
        want = kfuse.lora_linear(x, w, *args[:3], bias=args[3], backend="reference")
        assert torch.isfinite(want).all() and torch.equal(got, want)
    ids = torch.tensor([0, -1])
    multi = [kfuse.lora_linear_multi(x, w, A[None], B[None], torch.ones(1), torch.ones(1, dtype=torch.int32), ids,
                                     bias, backend=b) for b in ("cpu", "reference")]
    assert torch.isfinite(multi[1]).all() and torch.equal(multi[0], multi[1])


def test_cpu_half_gemm_screen_takes_fp32_for_infs_of_either_sign_only(seed: int) -> None:
    """The cpu backend screens the half product with aminmax before the exact isinf test (which cost a third of
    the bf16 forward): a product past -65504 also runs in fp32, while a NaN (no inf) keeps the half GEMM, so the
    other rows' bits do not depend on it, as before the screen."""
    x = torch.full((2, 4), 200.0, dtype=torch.float16)
    w = torch.full((3, 4), -100.0, dtype=torch.float16)  # x Wᵀ = -80000: -inf in half
    A, B, bias = torch.ones(1, 4), torch.zeros(3, 1), torch.full((3,), 30000.0, dtype=torch.float16)
    got = kfuse.lora_linear(x, w, A, B, 1.0, bias=bias, backend="cpu")
    assert torch.equal(got, torch.full((2, 3), -50000.0, dtype=torch.float16))
    x, w = torch.randn(2, 64).half(), torch.randn(24, 64).half()
    A, B = torch.randn(4, 64), torch.randn(24, 4)
    nan_row = x.clone()
    nan_row[0, 3] = float("nan")
    half = kfuse.lora_linear(x, w, A, B, 0.5, backend="cpu")
    with_nan = kfuse.lora_linear(nan_row, w, A, B, 0.5, backend="cpu")
    assert torch.isnan(with_nan[0]).all() and torch.equal(with_nan[1], half[1])
    fp32_base = (x.float() @ w.float().t() + 0.5 * (x.float() @ A.t()) @ B.t()).half()
    assert not torch.equal(fp32_base[1], half[1])  # (else the test could not tell the two GEMMs apart)


def test_add_adapter_failing_part_way_leaves_the_layer_as_it_was(monkeypatch, seed: int) -> None:
    """add_adapter set the grown stacks before building scalings and ranks: a failure between (out of
    memory, an interrupt; here torch.cat raising) left a layer every later forward refused (exceptions
    hunt, 2026-12-04). Now nothing changes, and the next add gets the id the failed one would have."""
    m = kfuse.nn.MultiLoRALinear(8, 6)
    m.add_adapter(torch.randn(2, 8), torch.randn(6, 2), 0.5)
    x, ids = torch.randn(3, 8), torch.tensor([0, -1, 0])
    before, y = {k: v.clone() for k, v in m.state_dict().items()}, m(x, ids)

    def failing_cat(*args, **kwargs):
        raise MemoryError("injected")

    with monkeypatch.context() as mp:
        mp.setattr(torch, "cat", failing_cat)
        with pytest.raises(MemoryError, match="injected"):
            m.add_adapter(torch.randn(4, 8), torch.randn(6, 4), 1.0)
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(m(x, ids), y) and m.add_adapter(torch.randn(4, 8), torch.randn(6, 4), 1.0) == 1


def test_adapters_added_or_loaded_in_inference_mode_serve_outside_it(seed: int) -> None:
    """add_adapter and load_state_dict replace the stacks with new tensors: under torch.inference_mode()
    those were inference tensors, so a later load, an edit of scalings or a backward through x outside it
    failed (nn.Linear's load keeps its tensors normal; bug hunt). Now the stacks stay normal tensors."""
    m, fresh, other = (kfuse.nn.MultiLoRALinear(8, 6) for _ in range(3))
    with torch.inference_mode():  # built, extended and called there as before (its reset_parameters refused)
        inside = kfuse.nn.MultiLoRALinear(8, 6)
        inside.add_adapter(torch.randn(2, 8), torch.randn(6, 2), 0.5)
        assert inside(torch.randn(2, 8), torch.tensor([0, -1])).shape == (2, 6)
    other.add_adapter(torch.randn(3, 8), torch.randn(6, 3), 2.0)
    with torch.inference_mode():
        m.add_adapter(torch.randn(2, 8), torch.randn(6, 2), 0.5)
        fresh.load_state_dict(m.state_dict())
    assert not any(b.is_inference() for layer in (m, fresh) for b in layer.buffers())
    x, ids = torch.randn(3, 8), torch.tensor([0, -1, 0])
    assert torch.equal(fresh(x, ids), m(x, ids))
    m.load_state_dict(other.state_dict())
    with torch.no_grad():
        fresh.scalings[0] = 1.0
    x.requires_grad_()
    with pytest.warns(UserWarning, match="forward-only"):
        m(x, ids).sum().backward()
    assert x.grad is not None


def test_layer_built_or_loaded_under_inference_mode_merges_outside_it(seed: int) -> None:
    """The merged flag is the layer's own buffer: built (or made by a load of a PEFT-style dict) under
    torch.inference_mode it was an inference tensor, and merge() outside it wrote W, then failed writing the flag:
    the layer then added the adapter twice, silently (inference hunt, 2026-12-07). Now the flag stays a normal
    tensor, and a flag that cannot be written (one the user made an inference tensor) leaves W as it was."""
    torch.manual_seed(seed)
    lin, x = torch.nn.Linear(8, 6), torch.randn(3, 8)
    with torch.inference_mode():
        built = kfuse.nn.LoRALinear.from_linear(lin, r=2)
        torch.nn.init.normal_(built.lora_B)
        loaded = kfuse.nn.LoRALinear.from_linear(torch.nn.Linear(8, 6), r=2)
    sd = {k: v.clone() for k, v in built.state_dict().items() if k != "lora_merged"}  # PEFT-style, normal tensors
    with torch.inference_mode():
        loaded.load_state_dict(sd, assign=True)
    with torch.no_grad():
        y_built = built(x)
    for m in (built, loaded):
        assert not m.lora_merged.is_inference()
        with torch.no_grad():
            y = m(x)
            m.merge()
            assert m.merged and torch.allclose(m(x), y, atol=1e-5)
            m.unmerge()
            assert not m.merged and torch.allclose(m(x), y, atol=1e-5)
    m, w = built, built.weight.detach().clone()
    with torch.inference_mode():
        m.lora_merged = torch.zeros((), dtype=torch.bool)
    with pytest.raises(RuntimeError, match="lora_merged is an inference tensor"):
        m.merge()
    assert not m.merged and not m.lora_merged and torch.equal(m.weight, w)
    with torch.inference_mode():
        m.merge()
    assert m.merged and torch.allclose(m(x), y_built, atol=1e-5)


def test_a_foreign_flag_is_read_again_after_a_write_or_a_data_swap(seed: int) -> None:
    """A lora_merged passed in (torch.func.functional_call) is read once per version; an inference tensor has no
    version, and the first value read was kept for good: a later write to it was ignored (inference hunt)."""
    from torch.func import functional_call  # noqa: PLC0415

    torch.manual_seed(seed)
    m, x = kfuse.nn.LoRALinear(8, 6, r=2), torch.randn(3, 8)
    with torch.no_grad():
        torch.nn.init.normal_(m.lora_B)
        merged = m.weight + m.scaling * m.lora_B @ m.lora_A
    with torch.inference_mode():
        flag = torch.zeros((), dtype=torch.bool)
        y0 = functional_call(m, {"lora_merged": flag}, (x,))
        flag.fill_(True)
        y1 = functional_call(m, {"lora_merged": flag, "weight": merged}, (x,))
    assert torch.allclose(y0, y1, atol=1e-5)  # merged: the base layer with the merged weight, not the adapter twice
    assert not torch.allclose(y1, functional_call(m, {"weight": merged}, (x,)), atol=1e-3)
    # Loaded through .data (as some checkpoint loaders do), which keeps the tensor's version: the value read
    # before was kept, and the adapter counted twice (module-conventions hunt, 2026-12-07).
    flag, w = torch.zeros((), dtype=torch.bool), m.weight.detach().clone()
    assert torch.allclose(functional_call(m, {"lora_merged": flag, "weight": w}, (x,)), y0, atol=1e-5)
    flag.data, w.data = torch.ones((), dtype=torch.bool), merged.clone()
    assert torch.allclose(functional_call(m, {"lora_merged": flag, "weight": w}, (x,)), y0, atol=1e-5)


@pytest.mark.parametrize("cls", ["LoRALinear", "MultiLoRALinear"])
def test_from_linear_refuses_a_computed_weight(cls: str) -> None:
    """from_linear keeps the tensors it is given. A parametrized base (spectral_norm, weight_norm) is
    recomputed at every access: the layer kept a stale snapshot outside its state_dict, or raised autograd's
    error for a non-leaf with freeze_base (module hunt, 2026-12-05). Refused, naming the remedy."""
    P = torch.nn.utils.parametrizations
    make = getattr(kfuse.nn, cls).from_linear
    for lin in (P.spectral_norm(nn.Linear(4, 3)), P.weight_norm(nn.Linear(4, 3))):
        for freeze in (True, False):
            with pytest.raises(ValueError, match=rf"{cls}.from_linear: linear.weight is parametrized .*"
                                                 r"remove_parametrizations\(linear, 'weight'\)"):
                make(lin, freeze_base=freeze)
        assert all(p.requires_grad for p in lin.parameters())  # left as it was
    for name in ("weight", "bias"):
        with pytest.warns(FutureWarning):
            lin = torch.nn.utils.weight_norm(nn.Linear(4, 3), name=name, dim=0)  # the deprecated hook form
        with pytest.raises(ValueError, match=rf"{cls}.from_linear: linear.{name} is computed from other tensors"):
            make(lin)


def test_lora_module_materialised_saves_its_own_merged_state() -> None:
    """to_empty() gives lora_merged no value: a layer built on meta and initialised by the user's own
    function (not reset_parameters) said merged=False but saved whatever byte the buffer held, and
    reloaded as merged, ignoring its adapter (module hunt, 2026-12-05). The layer's state goes into every
    new buffer; a new buffer filled with ones (what to_empty may leave) stands for the garbage here."""
    for merge in (False, True):
        m = kfuse.nn.LoRALinear(8, 6, r=2)
        if merge:
            m.merge()
        m._apply(lambda t: torch.ones_like(t))
        assert m.merged is merge and m.state_dict()["lora_merged"].item() is merge
    with torch.device("meta"):
        m = kfuse.nn.LoRALinear(8, 6, r=2)
    m.to_empty(device="cpu")
    for p in (m.weight, m.bias, m.lora_A, m.lora_B):
        nn.init.normal_(p)
    n = kfuse.nn.LoRALinear(8, 6, r=2)
    n.load_state_dict(m.state_dict())
    assert not m.merged and not n.merged
    x = torch.randn(3, 8)
    assert torch.equal(n(x), m(x))


def test_multi_lora_module_resets_as_torch_layers_do() -> None:
    """MultiLoRALinear had no reset_parameters: a generic re-initialisation after to_empty() (``if
    hasattr(m, "reset_parameters")``) left its base weight uninitialised (copy hunt). It initialises the
    base as nn.Linear does (the same draws) and empties the stacks."""
    torch.manual_seed(3)
    want = kfuse.nn.MultiLoRALinear(8, 6)
    m = kfuse.nn.MultiLoRALinear(8, 6, device="meta")
    m.add_adapter(torch.randn(2, 8, device="meta"), torch.randn(6, 2, device="meta"), 0.5)
    m.to_empty(device="cpu")
    torch.manual_seed(3)
    for module in m.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert m.num_adapters == 0 and m.r_max == 0
    assert torch.equal(m.weight, want.weight) and torch.equal(m.bias, want.bias)
    assert torch.equal(m(torch.ones(2, 8), torch.tensor([-1, -1])), want(torch.ones(2, 8), torch.tensor([-1, -1])))


def test_multi_adapter_cpu_work_does_not_grow_with_unused_adapters(seed: int) -> None:
    """The cpu backend visited every loaded adapter (slices, list conversions): 8192 loaded with 8 in
    the batch took 30x a torch loop over the 8 (perf hunt, 2026-12-04). Counts the aten ops the
    profiler sees with 4 and with 256 adapters loaded, the same 3 used: the same count and output."""
    small = multi_inputs((9,), 6, 5, [2, 3, 1, 4], torch.float32, torch.float32, "cpu", False)
    small["adapter_ids"] = torch.tensor([0, 2, -1, 2, 0, 3, 3, -1, 0])
    big = dict(small)
    big["A_stack"] = torch.cat([small["A_stack"], torch.randn(252, 4, 6)])
    big["B_stack"] = torch.cat([small["B_stack"], torch.randn(252, 5, 4)])
    big["scalings"] = torch.cat([small["scalings"], torch.ones(252)])
    big["ranks"] = torch.cat([small["ranks"], torch.full((252,), 4, dtype=torch.int32)])
    counts, outs = [], []
    for args in (small, big):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            outs.append(kfuse.lora_linear_multi(**args, backend="cpu"))
        counts.append(sum(e.name.startswith("aten::") for e in prof.events()))
    assert counts[0] == counts[1] and torch.equal(outs[0], outs[1]), counts


@pytest.mark.parametrize("rows", [5, 70])
def test_multi_adapter_cpu_groups_from_a_list_or_a_sort_alike(seed: int, monkeypatch, rows: int) -> None:
    """The cpu backend groups up to _HOST_GROUP_ROWS rows by adapter from a host list, more with
    argsort: the same groups (each adapter's rows in increasing order), so the same bits either way,
    and both match the reference."""
    t = multi_inputs((rows,), 19, 13, [3, 1, 0, 5], torch.float32, torch.float32, "cpu", False)
    outs = []
    for limit in (0, 1000):  # every batch sorted, then every batch from a list
        monkeypatch.setattr(ops, "_HOST_GROUP_ROWS", limit)
        outs.append(kfuse.lora_linear_multi(**t, backend="cpu"))
    assert torch.equal(outs[0], outs[1])
    assert_close(outs[0], kfuse.lora_linear_multi(**t, backend="reference"), torch.float32)


def test_multi_adapter_with_grad_runs_the_reference(seed: int) -> None:
    t = multi_inputs((4,), 6, 5, [2, 3], torch.float64, torch.float64, "cpu", False)
    x = t.pop("x").requires_grad_()
    with pytest.warns(UserWarning, match="forward-only"):
        ops._warned_grad = False
        y = kfuse.lora_linear_multi(x, **t, backend="cpu")
    (g,) = torch.autograd.grad(y.sum(), x)
    want = torch.autograd.grad(lora_linear_multi_reference(x, **t).sum(), x)[0]
    torch.testing.assert_close(g, want)


def test_multi_adapter_values_checked_under_compile_and_vmap(seed: int) -> None:
    """The reference path (an input requires grad) checked ids and ranks only eagerly: compiled, a bad id
    gave the base output and a bad rank was clamped, silently; under vmap over the ids, int() of a batched
    tensor failed with functorch's .item() error (bug hunt). Now asserted in the graph, and checked on the
    values beneath the vmap (which then matches a loop over the batch)."""
    t = multi_inputs((4,), 6, 5, [2, 3], torch.float64, torch.float64, "cpu", False)
    w = t.pop("weight").requires_grad_()
    ops._warned_grad = True  # (the forward-only warning is another test's)

    def f(ids, ranks):
        return kfuse.lora_linear_multi(weight=w, **dict(t, adapter_ids=ids, ranks=ranks), backend="cpu")

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    ids, ranks = t["adapter_ids"], t["ranks"]
    torch.testing.assert_close(compiled(ids, ranks), f(ids, ranks))
    with pytest.raises(RuntimeError, match=r"adapter_ids must be in \[-1, L\)"):
        compiled(torch.tensor([0, 7, 1, -1]), ranks)
    with pytest.raises(RuntimeError, match=r"ranks must be in \[0, r_max\]"):
        compiled(ids, torch.tensor([2, 5], dtype=torch.int32))
    batch = torch.stack([ids, ids.flip(0)])
    with torch.no_grad():
        got = torch.func.vmap(lambda i: kfuse.lora_linear_multi(weight=w, **dict(t, adapter_ids=i)))(batch)
        want = torch.stack([kfuse.lora_linear_multi(weight=w, **dict(t, adapter_ids=i)) for i in batch])
    torch.testing.assert_close(got, want)
    with pytest.raises(IndexError, match="adapter_ids must be in"):
        torch.func.vmap(lambda i: kfuse.lora_linear_multi(weight=w, **dict(t, adapter_ids=i)))(batch - 3)


@pytest.mark.cuda
def test_no_host_sync_and_cuda_graph(seed: int) -> None:
    """The GPU paths never synchronise the host (multi-adapter forward; forward and backward
    with dropout) and the serving forward replays in a CUDA graph with new ids."""
    t = multi_inputs((64,), 256, 192, [16, 8, 4], torch.bfloat16, torch.float32, "cuda", False)
    inp = Inputs((32,), 128, 96, 16, torch.bfloat16, torch.float32, "cuda")
    x, a, b = inp.x.clone().requires_grad_(), inp.A.clone().requires_grad_(), inp.B.clone().requires_grad_()
    kfuse.lora_linear_multi(**t)  # warm up (compiles the kernels)
    kfuse.lora_linear(x, inp.weight, a, b, 0.5, dropout_p=0.1).float().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            kfuse.lora_linear_multi(**t)
        kfuse.lora_linear(x, inp.weight, a, b, 0.5, dropout_p=0.1).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            kfuse.lora_linear_multi(**t)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(graph):
            y = kfuse.lora_linear_multi(**t)
    t["adapter_ids"].copy_(t["adapter_ids"].flip(0))
    graph.replay()
    assert_close(y, multi_rows(t, False), torch.bfloat16, "CUDA graph replay with new ids")


@pytest.mark.cuda
def test_auto_on_cuda_is_triton_and_devices_match(seed: int) -> None:
    inp = Inputs((5,), 16, 8, 4, torch.float16, torch.float32, "cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = kfuse.lora_linear(*inp.tensors()[:4], 0.5)
    assert not [w for w in caught if "falling back" in str(w.message)]
    torch.testing.assert_close(y, kfuse.lora_linear(*inp.tensors()[:4], 0.5, backend="triton"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="lora_A is on cpu but x is on cuda"):
        kfuse.lora_linear(inp.x, inp.weight, inp.A.cpu(), inp.B, 0.5)
    t = multi_inputs((4,), 6, 5, [2], torch.float32, torch.float32, "cuda", False)
    with pytest.raises(ValueError, match="adapter_ids is on cpu but x is on cuda"):
        kfuse.lora_linear_multi(**dict(t, adapter_ids=t["adapter_ids"].cpu()))


# ---------------------------------------------------------------- modules


def test_lora_linear_module(seed: int) -> None:
    m = kfuse.nn.LoRALinear(40, 24, r=8, lora_alpha=16, lora_dropout=0.1)
    assert m.scaling == 2.0 and not m.weight.requires_grad and not m.bias.requires_grad
    assert m.lora_A.requires_grad and m.lora_A.shape == (8, 40) and m.lora_B.shape == (24, 8)
    bound = 1 / math.sqrt(40)  # kaiming_uniform(a=√5) on [r, K]
    assert m.lora_A.abs().max() <= bound and m.lora_A.std() > bound / 3 and (m.lora_B == 0).all()
    x = torch.randn(3, 5, 40)
    torch.testing.assert_close(m(x), torch.nn.functional.linear(x, m.weight, m.bias))  # B = 0: the base layer
    assert kfuse.nn.LoRALinear(8, 4, r=16, lora_alpha=8, use_rslora=True).scaling == 2.0
    half = kfuse.nn.LoRALinear(8, 4, dtype=torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16 and half.lora_A.dtype == torch.float32
    assert half(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    # Training: gradients reach the adapter only; dropout in training mode only.
    with torch.no_grad():
        m.lora_B.normal_()
    m.train()
    m(x).square().sum().backward()
    assert m.lora_A.grad is not None and m.lora_B.grad is not None and m.weight.grad is None
    m.eval()
    y_eval = m(x)
    torch.testing.assert_close(y_eval, lora_linear_reference(x, m.weight, m.lora_A, m.lora_B, 2.0, m.bias))
    m.train()  # the module's training mode reaches the op: the functional call's mask under the same seed
    torch.manual_seed(7)
    y_train = m(x)
    torch.manual_seed(7)
    assert torch.equal(y_train, kfuse.lora_linear(x, m.weight, m.lora_A, m.lora_B, 2.0, m.bias, dropout_p=0.1,
                                                  training=True))
    assert not torch.allclose(y_train, y_eval, atol=1e-3), "training mode did not drop"
    nb = kfuse.nn.LoRALinear(8, 4, bias=False)
    x8 = torch.randn(3, 8)
    assert nb.bias is None and torch.equal(nb(x8), torch.nn.functional.linear(x8, nb.weight))  # B = 0
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        kfuse.nn.LoRALinear(4, 4, lora_dropout=1.0)
    with pytest.raises(ValueError, match="r must be >= 1"):
        kfuse.nn.LoRALinear(4, 4, r=0)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        kfuse.nn.LoRALinear(4, 4, backend="gpu")
    # A non-str backend is a TypeError naming it, as the functional ops' (it was a ValueError)
    for make in (lambda b: kfuse.nn.LoRALinear(4, 4, backend=b), lambda b: kfuse.nn.MultiLoRALinear(4, 4, backend=b),
                 lambda b: kfuse.lora_linear(x8[:, :4], nb.weight[:, :4], torch.zeros(2, 4), torch.zeros(4, 2), 1.0,
                                             backend=b)):
        with pytest.raises(TypeError, match="backend must be a str, 'auto' or one of .* got int"):
            make(1)


def _conv1d(in_features: int, out_features: int) -> nn.Module:
    """GPT-2's Conv1D (weight [in, out], y = x W + b), random weight and bias."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D(out_features, in_features)
    with torch.no_grad():
        conv1d.weight.normal_()
        conv1d.bias.normal_()
    return conv1d


@pytest.mark.parametrize("cls", ["LoRALinear", "MultiLoRALinear"])
def test_from_linear_takes_the_layout_from_the_module(cls: str, seed: int) -> None:
    """from_linear reads a GPT-2 Conv1D as [in, out] and an nn.Linear as [out, in] whatever fan_in_fan_out
    says, warning where it said otherwise (as PEFT does): a square Conv1D (GPT-2's c_proj) taken without
    fan_in_fan_out=True computed x Wᵀ where it computes x W, with no error (review 2026-12-04). A module
    of neither kind is refused."""
    make = getattr(kfuse.nn, cls).from_linear
    x = torch.randn(3, 16)
    for base, flag in ((_conv1d(16, 16), False), (_conv1d(16, 24), False), (torch.nn.Linear(16, 16), True)):
        with pytest.warns(UserWarning, match=f"using fan_in_fan_out={not flag}"):
            layer = make(base, fan_in_fan_out=flag).eval()
        assert layer.fan_in_fan_out is not flag
        with torch.no_grad():
            got = layer(x) if cls == "LoRALinear" else layer(x, torch.full((3,), -1))
            torch.testing.assert_close(got, base(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="must be an nn.Linear or a GPT-2 Conv1D; got Embedding"):
        make(torch.nn.Embedding(4, 3))


@pytest.mark.parametrize("out_features", [18, 30], ids=["wide", "square"])
@pytest.mark.parametrize("fifo", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge(fifo: bool, dtype: torch.dtype, out_features: int, seed: int) -> None:
    """from_linear shares the base weight and freezes it and the bias; merge folds s·B A into it (fp32
    accumulation) and the merged layer computes the unmerged one's output; unmerge restores W. Square too (GPT-2's
    c_proj): a delta merged in the other layout only fails there by value, not by shape."""
    linear = _conv1d(30, out_features) if fifo else torch.nn.Linear(30, out_features)
    linear = linear.to(dtype)
    w0 = linear.weight.detach().clone()
    m = kfuse.nn.LoRALinear.from_linear(linear, r=4, lora_alpha=8, fan_in_fan_out=fifo, lora_bias=True)
    assert m.weight is linear.weight and m.bias is linear.bias and not linear.weight.requires_grad
    assert not linear.bias.requires_grad
    with torch.no_grad():
        m.lora_B.normal_()
        m.lora_bias.normal_()
    m.eval()
    x = torch.randn(6, 30).to(dtype)
    y = m(x)
    m.merge()
    assert m.merged
    delta = (m.lora_B.detach().float() @ m.lora_A.detach().float()) * m.scaling
    want = (w0.float() + (delta.t() if fifo else delta)).to(dtype)
    assert torch.equal(linear.weight, want), "merge is W + s·B A accumulated in fp32, rounded once"
    assert_close(m(x), y, dtype, "merged vs unmerged")
    with pytest.warns(UserWarning, match="already merged"):
        m.merge()
    with pytest.raises(TypeError, match="kfuse.LoRALinear: weight must have x's dtype"):  # F.linear's bare error
        m(x.double())
    with pytest.raises(ValueError, match="kfuse.LoRALinear: weight must have shape"):
        m(x[:, :29])
    m.unmerge()
    assert not m.merged
    if dtype == torch.float32:
        torch.testing.assert_close(linear.weight, w0, rtol=0, atol=1e-6)
    else:
        assert_close(linear.weight, w0, dtype, "round trip")


def test_merge_and_unmerge_interrupted_anywhere_keep_weight_and_flag_together(seed: int) -> None:
    """A KeyboardInterrupt at every interrupt point in turn (tests/interrupts.py) of merge() then unmerge(): W
    and the merged flag agree after each (W written, the flag not, when an interrupt was raised as W's copy
    returned: the adapter then counted twice; process hunt, 2026-12-07), and the layer's output is the
    unmerged one's."""
    torch.manual_seed(seed)
    proto = kfuse.nn.LoRALinear(9, 7, r=3, backend="reference")
    torch.nn.init.normal_(proto.lora_B)
    x = torch.randn(4, 9)
    with torch.no_grad():
        want, w0 = proto(x), proto.weight.detach().clone()
    with torch.no_grad():
        merged_w = proto.weight + proto.scaling * proto.lora_B @ proto.lora_A

    def op(m):
        m.merge()
        m.unmerge()

    def check(m, interrupted):
        assert bool(m.lora_merged) == m.merged
        assert_close(m.weight.detach(), merged_w if m.merged else w0, torch.float32)
        with torch.no_grad():
            assert_close(m(x), want, torch.float32)

    assert interrupt_each_point(lambda: copy.deepcopy(proto), op, check) > 5


def test_multi_adapter_stacks_change_together_whatever_interrupts_them(seed: int) -> None:
    """A KeyboardInterrupt at every interrupt point in turn of add_adapter (a larger rank: every stack re-padded)
    and of load_state_dict (more adapters: every stack resized): the stacks were replaced one setattr at a
    time, and resized before the load's guard, so an interrupt left stacks of different adapter counts (every
    later call refused) or of uninitialised memory (garbage ranks and scalings read silently; process hunt,
    2026-12-07). After each the layer gives what it gave before, or what the finished call makes it give."""
    torch.manual_seed(seed)
    proto = kfuse.nn.MultiLoRALinear(8, 6, backend="reference")
    proto.add_adapter(torch.randn(2, 8), torch.randn(6, 2), 0.5)
    bigger = copy.deepcopy(proto)
    for _ in range(2):
        bigger.add_adapter(torch.randn(4, 8), torch.randn(6, 4), 1.5)
    x, ids = torch.randn(5, 8), torch.tensor([0, -1, 0, 0, -1])
    with torch.no_grad():
        before = proto(x, ids)
    A, B = torch.randn(5, 8), torch.randn(6, 5)
    for op in (lambda m: m.add_adapter(A, B, 2.0), lambda m: m.load_state_dict(bigger.state_dict())):

        def check(m, interrupted, op=op):
            with torch.no_grad():
                got = m(x, ids)  # (adapter 0 only: the same before and after either op)
            assert torch.equal(got, before)
            done = copy.deepcopy(proto)
            op(done)
            assert m.num_adapters in (proto.num_adapters, done.num_adapters)
            if m.num_adapters == done.num_adapters:
                assert all(torch.equal(a, b) for a, b in zip(m.buffers(), done.buffers(), strict=True))

        assert interrupt_each_point(lambda: copy.deepcopy(proto), op, check) > 5


def test_loads_see_the_state_dict_as_the_pre_hooks_leave_it(seed: int) -> None:
    """A load_state_dict pre-hook renaming an old checkpoint's keys: torch runs the pre-hooks inside
    Module._load_from_state_dict, after kfuse's override had read the dict. MultiLoRALinear then did not resize
    its stacks (a size-mismatch error), and a merged LoRALinear loading a PEFT-style dict with strict=False kept
    merged=True over the loaded base weight, silently (re-entrancy hunt, 2026-12-07). The hooks run first."""
    torch.manual_seed(seed)

    def renaming(pairs):
        def hook(module, sd, prefix, *args):
            for old, new in pairs:
                if prefix + old in sd:
                    sd[prefix + new] = sd.pop(prefix + old)
        return hook

    src = kfuse.nn.MultiLoRALinear(8, 6)
    src.add_adapter(torch.randn(3, 8), torch.randn(6, 3), 0.5)
    legacy = {{"A_stack": "A", "B_stack": "B"}.get(k, k): v for k, v in src.state_dict().items()}
    dst = kfuse.nn.MultiLoRALinear(8, 6)
    dst.register_load_state_dict_pre_hook(renaming([("A", "A_stack"), ("B", "B_stack")]))
    dst.load_state_dict(legacy)
    assert all(torch.equal(a, b) for a, b in zip(dst.buffers(), src.buffers(), strict=True))
    base = torch.nn.Linear(8, 6)
    peft_style = {"base_layer.weight": base.weight.detach().clone(), "base_layer.bias": base.bias.detach().clone(),
                  "lora_A": torch.randn(2, 8), "lora_B": torch.randn(6, 2)}
    want = kfuse.nn.LoRALinear(8, 6, r=2)
    want.load_state_dict({k.removeprefix("base_layer."): v for k, v in peft_style.items()})
    layer = kfuse.nn.LoRALinear(8, 6, r=2)
    layer.merge()
    layer.register_load_state_dict_pre_hook(renaming([("base_layer.weight", "weight"), ("base_layer.bias", "bias")]))
    layer.load_state_dict(peft_style, strict=False)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert not layer.merged and torch.equal(layer(x), want(x))


def test_vmapped_ensemble_takes_each_members_merged_flag(seed: int) -> None:
    """torch.func's ensemble recipe (stack_module_state, vmap over functional_call) on layers some of which are
    merged: the template's own flag decided for every member, and a merged member counted its adapter twice
    (1.87 off; function-transforms hunt, 2026-12-07). Each member's buffer picks its branch now."""
    torch.manual_seed(seed)
    proto = kfuse.nn.LoRALinear(4, 3, r=2, lora_alpha=4.0, dtype=torch.float64)
    torch.nn.init.normal_(proto.lora_B)
    members = [copy.deepcopy(proto) for _ in range(3)]
    members[1].merge()
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        want = torch.stack([m(x) for m in members])
    params, buffers = torch.func.stack_module_state(members)
    for template in (members[0], members[1]):
        base = copy.deepcopy(template).to("meta")
        got = torch.func.vmap(lambda p, b, x, base=base: torch.func.functional_call(base, (p, b), (x,)),
                              (0, 0, None))(params, buffers, x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_merged_checkpoint_loaded_whatever_interrupts_it_keeps_its_flag(seed: int) -> None:
    """A KeyboardInterrupt at every interrupt point in turn of load_state_dict of a merged layer's state into
    an unmerged one: raised as torch's load returned, the layer's Python copy of the flag still said unmerged,
    trusted for its own buffer, and the forward added the adapter twice (process hunt, 2026-12-07)."""
    torch.manual_seed(seed)
    src = kfuse.nn.LoRALinear(9, 7, r=3, backend="reference")
    torch.nn.init.normal_(src.lora_B)
    x = torch.randn(4, 9)
    with torch.no_grad():
        want = src(x)
    src.merge()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    proto = kfuse.nn.LoRALinear(9, 7, r=3, backend="reference")

    def check(m, interrupted):
        assert m.merged == bool(m.lora_merged)
        if m.merged and torch.equal(m.lora_B, src.lora_B):
            with torch.no_grad():
                assert_close(m(x), want, torch.float32)

    assert interrupt_each_point(lambda: copy.deepcopy(proto), lambda m: m.load_state_dict(sd), check) > 5


def test_merge_refuses_a_weight_computed_from_other_tensors(seed: int) -> None:
    """A parametrized or pruned weight is recomputed at each access: merge wrote into a temporary, set
    merged, and the forward then dropped the adapter (conversions hunt, 2026-12-05). Refused by name, the
    layer unchanged; with the parametrization removed the merge holds."""
    import torch.nn.utils.parametrize as P  # noqa: PLC0415
    import torch.nn.utils.prune as prune  # noqa: PLC0415

    class Twice(torch.nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * 2

    for name in ("parametrize", "prune"):
        m = kfuse.nn.LoRALinear(8, 6, r=2)
        torch.nn.init.normal_(m.lora_B)
        if name == "parametrize":
            P.register_parametrization(m, "weight", Twice())
        else:
            prune.l1_unstructured(m, "weight", amount=0.3)
        x = torch.randn(3, 8)
        y = m(x)
        with pytest.raises(RuntimeError, match="LoRALinear.merge: weight is computed from other tensors"):
            m.merge()
        assert not m.merged and torch.equal(m(x), y)
        if name == "parametrize":
            P.remove_parametrizations(m, "weight")
        else:
            prune.remove(m, "weight")
        m.merge()
        assert m.merged
        assert_close(m(x), y, torch.float32, f"merged after removing {name}")
        if name == "parametrize":
            P.register_parametrization(m, "weight", Twice())
        else:
            prune.l1_unstructured(m, "weight", amount=0.3)
        with pytest.raises(RuntimeError, match="LoRALinear.unmerge: weight is computed from other tensors"):
            m.unmerge()
    # A plain tensor as the weight (from_linear takes any 2-D tensor) is held: it merges (a first version of
    # the check refused every weight that is not a Parameter; review).
    m = kfuse.nn.LoRALinear(8, 6, r=2)
    torch.nn.init.normal_(m.lora_B)
    plain = m.weight.detach().clone()
    del m.weight
    m.weight = plain
    x = torch.randn(3, 8)
    y = m(x)
    m.merge()
    assert_close(m(x), y, torch.float32, "plain-tensor weight merged")


def test_merged_state_travels_with_the_weight(seed: int) -> None:
    """W of a merged layer holds the adapter: its state_dict says so, and a layer loading it (merged
    or not before) computes what the saved layer computed and unmerges back to the base W."""
    src = kfuse.nn.LoRALinear(9, 6, r=3).eval()
    with torch.no_grad():
        src.lora_B.normal_()
    w0, x = src.weight.detach().clone(), torch.randn(4, 9)
    with torch.no_grad():
        y = src(x)
    src.merge()
    merged_sd = src.state_dict()
    for start_merged in (False, True):
        dst = kfuse.nn.LoRALinear(9, 6, r=3).eval()
        if start_merged:
            dst.merge()
        dst.load_state_dict(merged_sd)
        assert dst.merged
        with torch.no_grad():
            torch.testing.assert_close(dst(x), y, rtol=1e-5, atol=1e-5)
        dst.unmerge()
        torch.testing.assert_close(dst.weight, w0, rtol=0, atol=1e-5)
    src.unmerge()
    dst = kfuse.nn.LoRALinear(9, 6, r=3).eval()
    dst.merge()
    dst.load_state_dict(src.state_dict())  # an unmerged checkpoint into a merged layer
    assert not dst.merged
    with torch.no_grad():
        torch.testing.assert_close(dst(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="_extra_state"):
        dst.load_state_dict({**src.state_dict(), "_extra_state": True})
    dst.merge()
    plain = {k: v for k, v in src.state_dict().items() if k != "lora_merged"}  # PEFT-style: the base W
    dst.load_state_dict(plain)  # strict, without the flag
    assert not dst.merged
    with torch.no_grad():
        torch.testing.assert_close(dst(x), y, rtol=1e-5, atol=1e-5)


def test_state_dict_holds_tensors_only(seed: int) -> None:
    """A LoRALinear's state_dict holds tensors only, as torch's layers' do (its merged flag was a dict of
    extra state, which safetensors, torch.func.functional_call and code cloning or moving every entry
    refused; review 2026-12-04): the flag is the 0-d bool buffer lora_merged. A snapshot of cloned
    entries keeps the flag that goes with its W; an earlier kfuse's checkpoint (the flag as extra
    state) still loads, strictly."""
    layer = kfuse.nn.LoRALinear(9, 6, r=3).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 9)
    with torch.no_grad():
        y = layer(x)
    sd = layer.state_dict()
    assert all(isinstance(v, Tensor) for v in sd.values()), {k: type(v) for k, v in sd.items()}
    with torch.no_grad():
        torch.testing.assert_close(torch.func.functional_call(layer, sd, (x,)), y)
    snap = {k: v.clone() for k, v in sd.items()}  # unmerged W, flag False
    layer.merge()
    assert bool(sd["lora_merged"]) and not bool(snap["lora_merged"])  # the live alias follows W
    fresh = kfuse.nn.LoRALinear(9, 6, r=3).eval()
    fresh.load_state_dict(snap)
    assert not fresh.merged
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-5)
    old = {k: v for k, v in layer.state_dict().items() if k != "lora_merged"}
    old["_extra_state"] = {"merged": True}  # a merged checkpoint of kfuse before 2026-12-04
    fresh.load_state_dict(old)
    assert fresh.merged
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-5)
    net = nn.Sequential(kfuse.nn.LoRALinear(9, 6, r=3), nn.ReLU())
    net[0].merge()
    again = nn.Sequential(kfuse.nn.LoRALinear(9, 6, r=3), nn.ReLU())
    again.load_state_dict({k: v.clone() for k, v in net.state_dict().items()})
    assert again[0].merged


def _unmerged_and_merged() -> tuple[kfuse.nn.LoRALinear, kfuse.nn.LoRALinear, Tensor, Tensor]:
    """A layer with a nonzero adapter, its merged copy, an input and the layer's output."""
    layer = kfuse.nn.LoRALinear(9, 6, r=3).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    merged = copy.deepcopy(layer)
    merged.merge()
    x = torch.randn(4, 9)
    with torch.no_grad():
        return layer, merged, x, layer(x)


def test_merged_flag_of_functional_calls_and_shallow_copies(seed: int) -> None:
    """The forward takes the merged state from the lora_merged buffer it is given: torch.func.functional_call
    with the other state's state_dict ran the module's own branch, silently off by the whole adapter (copy
    hunt); also for a state_dict's aliases written since, for stacked modules under vmap, on meta, and after
    a move or cast."""
    layer, merged, x, y = _unmerged_and_merged()
    with torch.no_grad():
        for module, other in ((layer, merged), (merged, layer)):
            torch.testing.assert_close(torch.func.functional_call(module, other.state_dict(), (x,)), y)
        torch.testing.assert_close(layer(x), y)  # the module's own state again
        # vmap over stacked modules (one merge state: a batched flag has no one value) still runs, and a
        # module on meta (no value to read) still runs too
        for one in (layer, merged):
            layers = [one, copy.deepcopy(one)]
            params, buffers = torch.func.stack_module_state(layers)
            stacked = torch.vmap(lambda p, b, one=one: torch.func.functional_call(one, (p, b), (x,)))(params, buffers)
            torch.testing.assert_close(stacked, torch.stack([m(x) for m in layers]))
        meta = copy.deepcopy(merged).to("meta")
        assert meta(x.to("meta")).shape == y.shape and meta.merged
        sd = layer.state_dict()  # aliases: other tensor objects over the live buffers
        torch.testing.assert_close(torch.func.functional_call(layer, sd, (x,)), y)
        layer.merge()  # written through the module: the alias's kept value is stale, its version tells
        torch.testing.assert_close(torch.func.functional_call(layer, sd, (x,)), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.to(torch.float64).float()(x), y, rtol=1e-5, atol=1e-5)


def test_merged_flag_of_compiled_functional_calls(seed: int) -> None:
    """Under torch.compile the forward took the module's own merged state, whatever lora_merged buffer
    functional_call gave it: off by the whole adapter, silently (feature-combination hunt). With another buffer
    both branches run and the buffer picks, in one graph (a first fix read it on the host: a graph break, which
    fullgraph=True refused for state_dict aliases and vmap ensembles; review)."""
    layer, merged, x, y = _unmerged_and_merged()
    with torch.no_grad():
        for module, other in ((layer, merged), (merged, layer), (layer, layer)):  # (layer, layer): aliases
            torch._dynamo.reset()
            call = torch.compile(lambda s, x, m=module: torch.func.functional_call(m, s, (x,)), backend="eager",
                                 fullgraph=True)
            torch.testing.assert_close(call(dict(other.state_dict()), x), y, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(x), y)  # its own
        params, buffers = torch.func.stack_module_state([layer, merged])  # an ensemble: each member its own state
        ens = torch.compile(lambda p, b: torch.vmap(lambda p, b: torch.func.functional_call(layer, (p, b), (x,)))(
            p, b), backend="eager", fullgraph=True)
        torch.testing.assert_close(ens(params, buffers), torch.stack([y, y]), rtol=1e-5, atol=1e-5)


def test_merged_flag_through_resets_and_state_dicts_taken_before_a_merge(seed: int) -> None:
    """reset_parameters re-initialises W, so the layer is unmerged after it; reset_lora_parameters on a
    merged layer unmerges first (W back to the base); a state_dict taken before merge()/unmerge() says
    what its W (the live tensor) holds (state bug hunt: the flag stayed True, the adapter was ignored;
    W kept the old adapter; the snapshot counted the adapter twice)."""
    layer = kfuse.nn.LoRALinear(9, 6, r=3)
    w0, x = layer.weight.detach().clone(), torch.randn(4, 9)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.merge()
    layer.reset_lora_parameters()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    layer.merge()
    layer.reset_parameters()
    assert not layer.merged
    with torch.no_grad():
        layer.lora_B.normal_()
        want = x @ layer.weight.t() + layer.bias + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    out = layer(x)
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)
    for flip in ("merge", "unmerge"):
        sd = layer.state_dict()
        getattr(layer, flip)()
        dst = kfuse.nn.LoRALinear(9, 6, r=3).eval()
        dst.load_state_dict(sd)
        with torch.no_grad():
            torch.testing.assert_close(dst(x), want, rtol=1e-5, atol=1e-5, msg=f"state_dict taken before {flip}()")
        assert dst.merged == layer.merged
    copy_of_flag = kfuse.nn.LoRALinear(9, 6, r=3)
    copy_of_flag.load_state_dict(layer.state_dict())
    copy_of_flag.merge()  # the loaded layer has its own flag
    assert not layer.merged


def test_multi_lora_module(seed: int) -> None:
    """Adapters of different ranks (the stacks re-pad as r_max grows) give each row what its
    own LoRALinear gives; -1 rows get the base layer; ids per row or per sequence."""
    linear = torch.nn.Linear(20, 12)
    layers = []
    multi = kfuse.nn.MultiLoRALinear.from_linear(linear)
    for r, alpha in ((2, 4.0), (6, 3.0), (3, 9.0)):
        layer = kfuse.nn.LoRALinear.from_linear(linear, r=r, lora_alpha=alpha).eval()
        with torch.no_grad():
            layer.lora_B.normal_()
        assert multi.add_adapter(layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling) == len(layers)
        layers.append(layer)
    assert multi.num_adapters == 3 and multi.r_max == 6 and multi.ranks.tolist() == [2, 6, 3]
    x = torch.randn(4, 5, 20)
    ids = torch.tensor([2, -1, 0, 1])
    with torch.no_grad():
        y = multi(x, ids)  # one id per sequence
        for b, a in enumerate(ids.tolist()):
            want = linear(x[b]) if a < 0 else layers[a](x[b])
            torch.testing.assert_close(y[b], want, rtol=1e-5, atol=1e-5)
        rows = torch.randint(-1, 3, (4, 5))
        torch.testing.assert_close(multi(x, rows), multi(x, rows.reshape(-1)))
    fresh = kfuse.nn.MultiLoRALinear(20, 12)
    fresh.load_state_dict(multi.state_dict())  # the stacks take the saved shapes
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, ids), y)
    with pytest.raises(ValueError, match=r"lora_B must have shape \[N, r\] = \[12, 2\]"):
        multi.add_adapter(torch.randn(2, 20), torch.randn(12, 3), 1.0)


def test_multi_lora_replace_adapter_keeps_ids(seed: int) -> None:
    """replace_adapter puts an adapter of any rank (larger: the stacks re-pad; smaller) in another's slot: rows
    with that id get the new adapter's output, the others' are bit-identical, and no id moves (a server reuses
    an evicted adapter's slot instead of growing the stacks). Bad ids and shapes name the method."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(20, 12)
    multi = kfuse.nn.MultiLoRALinear.from_linear(linear)
    layers = []
    for r in (2, 6, 3, 9, 1):
        layer = kfuse.nn.LoRALinear.from_linear(linear, r=r, lora_alpha=2.0 * r).eval()
        torch.nn.init.normal_(layer.lora_B)
        layers.append(layer)
    for layer in layers[:3]:
        multi.add_adapter(layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling)
    x, ids = torch.randn(7, 20), torch.tensor([0, 1, 2, -1, 1, 0, 2])
    with torch.no_grad():
        before = multi(x, ids)
        for slot, new in ((1, layers[3]), (1, layers[4]), (0, layers[3])):
            assert multi.replace_adapter(slot, new.lora_A.detach(), new.lora_B.detach(), new.scaling) is None
            layers[slot] = new
            y = multi(x, ids)
            assert multi.num_adapters == 3 and multi.r_max == 9
            for m, a in enumerate(ids.tolist()):
                want = linear(x[m]) if a < 0 else layers[a](x[m : m + 1])[0]
                torch.testing.assert_close(y[m], want, rtol=1e-5, atol=1e-5)
            assert torch.equal(y[ids == 2], before[ids == 2]) and torch.equal(y[ids == -1], before[ids == -1])
    assert multi.ranks.tolist() == [9, 1, 3]
    # Under inference mode, and with trainable tensors: the stacks stay normal tensors without a history (as
    # add_adapter's; replace_adapter lacked its decorators: re-entrancy hunt, 2026-12-07).
    with torch.inference_mode():
        multi.replace_adapter(2, layers[0].lora_A, layers[0].lora_B, layers[0].scaling)
    multi.replace_adapter(1, layers[0].lora_A, layers[0].lora_B, layers[0].scaling)
    assert not any(b.is_inference() or b.requires_grad for b in multi.buffers())
    copy.deepcopy(multi).load_state_dict(multi.state_dict())
    for bad, err, msg in ((3, IndexError, "adapter_id 3 is out of range: the layer holds 3 adapters"),
                          (-1, IndexError, "adapter_id -1 is out of range"),
                          (True, TypeError, "adapter_id must be an int; got bool"),
                          (1.0, TypeError, "adapter_id must be an int; got float")):
        with pytest.raises(err, match=r"MultiLoRALinear.replace_adapter: " + msg):
            multi.replace_adapter(bad, torch.randn(2, 20), torch.randn(12, 2), 1.0)
    with pytest.raises(ValueError, match=r"MultiLoRALinear.replace_adapter: lora_B must have shape \[N, r\]"):
        multi.replace_adapter(0, torch.randn(2, 20), torch.randn(12, 3), 1.0)
    assert multi.ranks.tolist() == [9, 9, 9]  # (the refused calls changed nothing)


def test_multi_lora_adds_on_two_threads_keep_both_adapters() -> None:
    """Two threads adding adapters at once built from the same stacks: the later replaced the earlier's
    adapter, both got one id, or the copy failed on resized stacks (serving hunt, 2026-12-05: 8 threads lost
    7 adapters). Here the other thread's add starts exactly when this one sets the stacks, then lands while
    this one builds (it builds again), then a load of same-shaped stacks lands while it builds."""
    import threading  # noqa: PLC0415

    from kfuse.nn import MultiLoRALinear  # noqa: PLC0415

    gen = torch.Generator().manual_seed(0)
    adapters = [(torch.randn(r, 16, generator=gen), torch.randn(12, r, generator=gen)) for r in (4, 6, 3)]
    got: dict[int, object] = {}
    threads: list[threading.Thread] = []

    def check_all_three(m: MultiLoRALinear) -> None:  # each caller's id holds its own adapter
        assert sorted(got.values()) == [0, 1, 2] and m.num_adapters == 3, got
        for i, (a, b) in enumerate(adapters):
            j, r = got[i], a.shape[0]
            assert torch.equal(m.A_stack[j, :r], a) and torch.equal(m.B_stack[j, :, :r], b), f"adapter {i}"
            assert m.scalings[j] == i + 1.0 and m.ranks[j] == r

    class Watched(MultiLoRALinear):
        def _set_stacks(self, names: tuple[str, ...], stacks: list[torch.Tensor]) -> None:
            super()._set_stacks(names, stacks)
            if "A_stack" in names and self.__dict__.pop("watch", False):
                def add() -> None:
                    try:
                        got[2] = self.add_adapter(*adapters[2], 3.0)
                    except Exception as e:  # noqa: BLE001 (the test reports it)
                        got[2] = e

                threads.append(threading.Thread(target=add))
                threads[-1].start()
                threads[-1].join(0.5)  # it runs here, or waits for this add to finish

    m = Watched(16, 12, backend="cpu")
    got[0] = m.add_adapter(*adapters[0], 1.0)
    m.__dict__["watch"] = True
    got[1] = m.add_adapter(*adapters[1], 2.0)
    for t in threads:
        t.join()
    check_all_three(m)

    # The stacks are built outside the lock: another thread's add that lands meanwhile makes this one build
    # again from the new stacks (here it runs to completion while this add copies its lora_A).
    class Interrupting(torch.Tensor):
        meanwhile: list = []  # what another thread does, to completion, while this add copies its lora_A

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
            if func is torch.Tensor.to and cls.meanwhile:
                other = threading.Thread(target=cls.meanwhile.pop())
                other.start()
                other.join()
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))

    m = MultiLoRALinear(16, 12, backend="cpu")
    got.clear()
    got[0] = m.add_adapter(*adapters[0], 1.0)
    Interrupting.meanwhile.append(lambda: got.__setitem__(2, m.add_adapter(*adapters[2], 3.0)))
    got[1] = m.add_adapter(adapters[1][0].as_subclass(Interrupting), adapters[1][1], 2.0)
    assert not Interrupting.meanwhile
    check_all_three(m)
    # A load of same-shaped stacks copies into them in place (the same tensors): seen by their versions.
    src = MultiLoRALinear(16, 12, backend="cpu")
    src.add_adapter(*adapters[2], 3.0)
    m = MultiLoRALinear(16, 12, backend="cpu")
    m.add_adapter(torch.zeros_like(adapters[2][0]), torch.zeros_like(adapters[2][1]), 1.0)
    Interrupting.meanwhile.append(lambda: m.load_state_dict(src.state_dict()))
    assert m.add_adapter(adapters[1][0].as_subclass(Interrupting), adapters[1][1], 2.0) == 1
    r2, r1 = adapters[2][0].shape[0], adapters[1][0].shape[0]
    assert torch.equal(m.A_stack[0, :r2], adapters[2][0]) and m.scalings[0] == 3.0, "the load was lost"
    assert torch.equal(m.A_stack[1, :r1], adapters[1][0]) and m.scalings[1] == 2.0


def test_multi_lora_forward_on_another_thread_reads_one_set_of_stacks() -> None:
    """A server's forward on one thread read the new A_stack beside the old ranks while another thread added
    an adapter (add_adapter set the four buffers one after another), and failed: 349 spurious errors in 300
    adds (concurrency hunt, 2026-12-05). Here the other thread's forward comes exactly as the stacks are set
    (one update of the buffers since 2026-12-07); it must see the old set or the new one, whole."""
    import threading  # noqa: PLC0415

    from kfuse.nn import MultiLoRALinear  # noqa: PLC0415

    results: list = []
    threads: list[threading.Thread] = []

    class Watched(MultiLoRALinear):
        def _set_stacks(self, names: tuple[str, ...], stacks: list[torch.Tensor]) -> None:
            super()._set_stacks(names, stacks)
            if "A_stack" in names and self.__dict__.get("watch"):
                def serve() -> None:
                    try:
                        with torch.no_grad():
                            results.append(self(x, ids))
                    except Exception as e:  # noqa: BLE001 (the test reports it)
                        results.append(e)

                threads.append(threading.Thread(target=serve))
                threads[-1].start()
                threads[-1].join(0.5)  # it runs here, or waits for the other three buffers

    gen = torch.Generator().manual_seed(0)
    m = Watched(16, 12, backend="cpu")
    m.add_adapter(torch.randn(4, 16, generator=gen), torch.randn(12, 4, generator=gen), 0.5)
    x, ids = torch.randn(5, 16, generator=gen), torch.tensor([0, -1, 0, 0, -1])
    with torch.no_grad():
        expected = m(x, ids)
    m.__dict__["watch"] = True
    m.add_adapter(torch.randn(4, 16, generator=gen), torch.randn(12, 4, generator=gen), 2.0)
    m.__dict__["watch"] = False
    for t in threads:
        t.join()
    assert len(results) == 1
    assert not isinstance(results[0], Exception), results[0]
    assert torch.equal(results[0], expected)


def test_multi_lora_load_holds_up_no_other_layer() -> None:
    """The stacks' lock was one for every layer and a load runs user hooks under it: a hook waiting for another
    layer's forward on another thread waited forever (review of the change, 2026-12-05). Each layer has its
    own."""
    import threading  # noqa: PLC0415

    from kfuse.nn import MultiLoRALinear  # noqa: PLC0415

    m1, m2 = MultiLoRALinear(8, 6, backend="cpu"), MultiLoRALinear(8, 6, backend="cpu")
    m1.add_adapter(torch.randn(2, 8), torch.randn(6, 2), 1.0)
    m2.add_adapter(torch.randn(2, 8), torch.randn(6, 2), 1.0)
    done = []

    def hook(*args: object) -> None:
        t = threading.Thread(target=lambda: done.append(m2(torch.randn(3, 8), torch.tensor([0, -1, 0]))))
        t.start()
        t.join(5)

    m1._register_load_state_dict_pre_hook(hook)
    m1.load_state_dict(m1.state_dict())
    assert len(done) == 1, "the other layer's forward waited for this layer's load"


def test_multi_lora_failed_load_keeps_the_adapters() -> None:
    """A load whose copy fails (here a checkpoint of meta tensors, which have no values) raises, as torch's;
    the stacks, resized for it, kept uninitialised memory: the adapters were gone and the next forward
    read garbage ranks (state-after-errors hunt, 2026-12-05). The layer keeps its adapters."""
    torch.manual_seed(0)
    m = kfuse.nn.MultiLoRALinear(4, 3, backend="reference")
    m.add_adapter(torch.randn(2, 4), torch.randn(3, 2), 0.5)
    x, ids = torch.randn(5, 4), torch.tensor([0, -1, 0, 0, -1])
    y, before = m(x, ids), {k: v.clone() for k, v in m.state_dict().items()}
    with torch.device("meta"):
        src = kfuse.nn.MultiLoRALinear(4, 3, backend="reference")
        for r in (1, 3, 2):
            src.add_adapter(torch.randn(r, 4), torch.randn(3, r), 1.0)
    with pytest.raises(RuntimeError, match="Cannot copy out of meta tensor"):
        m.load_state_dict(src.state_dict())
    assert m.num_adapters == 1 and torch.equal(m(x, ids), y)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    # Stacks of the same shape are copied into in place: an unrelated key failing (the base weight's
    # shape) left the checkpoint's scalings and ranks beside the layer's own A and B (review of the fix).
    src = kfuse.nn.MultiLoRALinear(4, 3, backend="reference")
    src.add_adapter(torch.randn(2, 4), torch.randn(3, 2), 3.0)
    bad = dict(src.state_dict(), weight=torch.randn(5, 4))
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        m.load_state_dict(bad)
    stacks = ("A_stack", "B_stack", "scalings", "ranks")  # (the bias loads: torch's loads are per key)
    assert all(torch.equal(getattr(m, k), before[k]) for k in stacks)


def test_an_integer_dtype_is_refused_by_name() -> None:
    """LoRALinear(dtype=torch.int64) failed in the init ("check_uniform_bounds not implemented for 'Long'";
    error-message hunt)."""
    with pytest.raises(TypeError, match="LoRALinear: dtype must be a floating dtype; got torch.int64"):
        kfuse.nn.LoRALinear(8, 4, dtype=torch.int64)


def test_multi_lora_load_refuses_another_layers_stacks() -> None:
    """Stacks saved by a layer of other in/out features (or an inconsistent set) are refused with
    torch's size-mismatch error, strict or not, and the stacks are left as they were: they are
    only re-sized to a set that fits this layer."""
    m = kfuse.nn.MultiLoRALinear(5, 7)
    m.add_adapter(torch.randn(2, 5), torch.randn(7, 2), 0.5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    other = kfuse.nn.MultiLoRALinear(6, 8)
    other.add_adapter(torch.randn(3, 6), torch.randn(8, 3), 1.0)
    bigger = kfuse.nn.MultiLoRALinear(5, 7)
    bigger.add_adapter(torch.randn(3, 5), torch.randn(7, 3), 1.0)
    bigger.add_adapter(torch.randn(1, 5), torch.randn(7, 1), 1.0)
    mixed = {**bigger.state_dict(), "scalings": torch.ones(3)}  # L = 2 stacks with 3 scalings
    stacks = ("A_stack", "B_stack", "scalings", "ranks")
    for sd, strict in ((other.state_dict(), True), ({k: other.state_dict()[k] for k in stacks}, False),
                       (mixed, True)):
        with pytest.raises(RuntimeError, match="size mismatch"):
            m.load_state_dict(sd, strict=strict)
        # (torch's load still copies the entries that fit, as weight and bias from `mixed`)
        assert all(torch.equal(getattr(m, k), before[k]) for k in stacks), "a refused load changed the stacks"
    m.load_state_dict({"scalings": torch.tensor([3.0])}, strict=False)  # fits with the module's own stacks
    assert m.scalings.tolist() == [3.0]
    m.load_state_dict(bigger.state_dict())  # a consistent set for this layer: re-sized and loaded
    assert m.num_adapters == 2 and m.r_max == 3


# ---------------------------------------------------------------- torch.library, compile, routes


@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("backend,device", OP_BACKENDS)
def test_registered_op_gradients_match_the_reference(backend: str, device: str, fifo: bool, seed: int) -> None:
    """torch.ops.kfuse.lora_forward's registered backward gives every input's gradient, the biases' included: opcheck
    compares the op with its own backward (eager against AOT), so a dropped or swapped dbias / dlora_bias passed it
    and every compiled test (mutation hunt, 2026-12-06). Against the reference's autograd, scaling != 1 so the two
    bias gradients differ, W trainable, x 3-D, and the eager op's gradients on the same inputs are the same bits."""
    inp = Inputs((2, 3), 11, 7, 3, torch.float32, torch.float32, device, True, True, fifo)
    leaves = [t.detach().clone().requires_grad_() for t in inp.tensors()]
    gy = torch.randn(2, 3, 7, device=device)
    x, w, a, b, bias, lb = leaves
    y = torch.ops.kfuse.lora_forward(x, w, a, b, 0.6, bias, lb, 0.0, fifo, backend)[0]
    got = torch.autograd.grad(y, leaves, gy)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(lora_linear_reference(*ref[:4], 0.6, *ref[4:], fan_in_fan_out=fifo), ref, gy.double())
    for name, g, h in zip(("x", "weight", "lora_A", "lora_B", "bias", "lora_bias"), got, want, strict=True):
        assert_close(g, h.float(), torch.float32, f"d{name}")
    eager = torch.autograd.grad(kfuse.lora_linear(*leaves[:4], 0.6, *leaves[4:], fan_in_fan_out=fifo,
                                                  backend=backend), leaves, gy)
    assert all(torch.equal(g, e) for g, e in zip(got, eager, strict=True))


@pytest.mark.parametrize("backend,device", OP_BACKENDS)
def test_opcheck(backend: str, device: str, seed: int) -> None:
    inp = Inputs((3, 4), 11, 7, 3, torch.float32, torch.float32, device)
    x, w, a, b, bias, lb = (t.requires_grad_() for t in inp.tensors())
    for args in ((x, w, a, b, 0.5, bias, lb, 0.0, False, backend),
                 (x.detach()[0], w.detach().t().contiguous(), a, b, 2.0, None, None, 0.0, True, backend)):
        torch.library.opcheck(torch.ops.kfuse.lora_forward, args)
    # With dropout the op draws a seed: the checks that compare two runs are left out.
    torch.library.opcheck(torch.ops.kfuse.lora_forward, (x, w, a, b, 0.5, bias, lb, 0.3, False, backend),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    y, S, seed_t = torch.ops.kfuse.lora_forward(x.detach(), w.detach(), a.detach(), b.detach(), 0.5, None, None,
                                                0.3, False, backend)
    gy = torch.randn_like(y)
    for needs in ((True, True, True, True, True, True), (False, False, True, True, False, True)):
        torch.library.opcheck(torch.ops.kfuse.lora_backward, (gy, x.detach(), w.detach(), a.detach(), b.detach(), 0.5,
                                                              S, seed_t, 0.3, False, *needs, backend))
    # Transposed weight and adapters, on this backend and the reference: the reference gave gradients laid out
    # like them where the fake kernel says contiguous, and a compiled backward failed Inductor's stride check
    # (export hunt, 2026-12-05; opcheck compares no strides).
    wt, at, bt = (t.detach().t().contiguous().t() for t in (w, a, b))
    for name in (backend, "reference"):
        args = (gy, x.detach(), wt, at, bt, 0.5, S, seed_t, 0.3, False, *(True,) * 6, name)
        if name == backend:  # (opcheck's schema check cannot look inside the reference's torch.func.vjp)
            torch.library.opcheck(torch.ops.kfuse.lora_backward, args)
        with FakeTensorMode() as mode:
            fake = torch.ops.kfuse.lora_backward(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                   for a in args))
        for r, f in zip(torch.ops.kfuse.lora_backward(*args), fake, strict=True):
            assert r.shape == f.shape and r.stride() == f.stride(), (name, r.stride(), f.stride())
    t = multi_inputs((6,), 9, 5, [2, 4], torch.float32, torch.float32, device, False)
    torch.library.opcheck(torch.ops.kfuse.lora_multi_forward,
                          (t["x"], t["weight"], t["A_stack"], t["B_stack"], t["scalings"], t["ranks"], t["adapter_ids"],
                           t["bias"], False, backend))


def test_exported_layers_under_autocast(seed: int) -> None:
    """The registered forwards apply the public ops' autocast casts: an exported LoRALinear failed under
    torch.autocast ("self and mat2 must have the same dtype") and an exported MultiLoRALinear returned
    float32 where eager gives bfloat16 (bug hunt). Exported in float32, run under autocast: eager's
    dtype and bits."""
    layer = kfuse.nn.LoRALinear(6, 5, r=2, backend="cpu")
    with torch.no_grad():
        layer.lora_B.normal_()
    multi = kfuse.nn.MultiLoRALinear.from_linear(torch.nn.Linear(6, 5))
    multi.add_adapter(torch.randn(3, 6), torch.randn(5, 3), 0.5)
    x, ids = torch.randn(2, 3, 6), torch.tensor([[0, -1, 0], [-1, 0, 0]])
    for mod, args in ((layer, (x,)), (multi, (x, ids))):
        program = torch.export.export(mod, args).module()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = mod(*args), program(*args)
        assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want), type(mod).__name__


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16])
def test_autocast_casts_as_torch_does(backend: str, adapter_dtype: torch.dtype, seed: int) -> None:
    """Under torch.autocast (CPU, bf16) the ops run as on autocast's casts, given by hand outside it: x,
    W and bias in bf16; float32 adapters kept, half ones in bf16; a bf16 result and gradients in each
    input's dtype, bit for bit; float64 x untouched. Eager and compiled (fullgraph). The ops' inner GEMMs
    were autocast one by one and met in mixed dtypes (bug hunt)."""
    cast = torch.bfloat16
    x, weight, A, B, bias, lbias = make_layer(7, 12, 10, 3, False, True, True, torch.float32, adapter_dtype, "cpu")
    leaves = [t.requires_grad_() for t in (x, weight, A, B, bias, lbias)]
    g = torch.randn(7, 10)

    def call(x, weight, A, B, bias, lbias):
        return kfuse.lora_linear(x, weight, A, B, 1.5, bias, lbias, backend=backend)

    def grads(y):
        return torch.autograd.grad(y, leaves, g.to(y.dtype))

    a_cast = adapter_dtype if adapter_dtype == torch.float32 else cast
    y0 = call(x.to(cast), weight.to(cast), A.to(a_cast), B.to(a_cast), bias.to(cast), lbias.to(a_cast))
    want = grads(y0)
    compiled = torch.compile(call, fullgraph=True)
    for fn in (call, compiled):
        with torch.autocast("cpu", dtype=cast):
            y = fn(*leaves)
            # A backward inside the block too: on the CPU it runs on this thread, under autocast, whose
            # casts of the backward's GEMMs met in mixed dtypes (PEFT bug hunt). The kernels' gradients are
            # the same; the reference's are torch's autograd, whose GEMMs autocast rounds to bf16 there.
            inside = grads(fn(*leaves))
        got = grads(y)
        for a, b in zip(inside, got, strict=True):
            assert torch.equal(a, b) if backend != "reference" else assert_close(a, b, cast, "inside") is None
        assert y.dtype == cast and all(a.dtype == t.dtype for a, t in zip(got, leaves, strict=True))
        if fn is compiled and backend == "reference":  # Inductor fuses the reference's torch ops: other roundings
            assert_close(y, y0, cast, "compiled y")
            assert all(assert_close(a, b, cast, "compiled grad") is None for a, b in zip(got, want, strict=True))
        else:
            assert torch.equal(y, y0) and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with torch.autocast("cpu", dtype=cast):  # the registered op called directly (exported graphs, modes)
        inside = grads(torch.ops.kfuse.lora_forward(*leaves[:4], 1.5, *leaves[4:], 0.0, False, backend)[0])
    for a, b in zip(inside, want, strict=True):
        assert torch.equal(a, b) if backend != "reference" else assert_close(a, b, cast, "registered") is None
    t = multi_inputs((6,), 12, 10, [2, 3], torch.float32, adapter_dtype, "cpu", False)
    args = (t["x"], t["weight"], t["A_stack"], t["B_stack"], t["scalings"], t["ranks"], t["adapter_ids"], t["bias"])
    with torch.autocast("cpu", dtype=cast):
        ym = kfuse.lora_linear_multi(*args, backend=backend)
    by_hand = [a.to(cast) if i in (0, 1, 7) or (i in (2, 3) and adapter_dtype != torch.float32) else a
               for i, a in enumerate(args)]
    assert ym.dtype == cast and torch.equal(ym, kfuse.lora_linear_multi(*by_hand, backend=backend))
    x64, w64, A64, B64, _, _ = make_layer(3, 12, 10, 3, False, False, False, torch.float64, torch.float64, "cpu")
    with torch.autocast("cpu", dtype=cast):
        y64 = kfuse.lora_linear(x64, w64, A64, B64, 1.5, backend=backend)
    assert y64.dtype == torch.float64 and torch.equal(y64, kfuse.lora_linear(x64, w64, A64, B64, 1.5, backend=backend))


@pytest.mark.parametrize("backend,device", [*OP_BACKENDS, pytest.param("reference", "cpu", id="reference")])
def test_compile_fullgraph(backend: str, device: str, seed: int) -> None:
    """A small model of LoRALinear layers (dropout, both layouts, lora_bias, a 3-D input)
    compiles with fullgraph=True, and its forward and backward match eager under the same seed
    (the kernel backends draw the seed inside the op; Inductor's own RNG is switched to
    eager's for the reference)."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        kfuse.nn.LoRALinear(12, 20, r=4, lora_dropout=0.2, backend=backend),
        torch.nn.GELU(),
        kfuse.nn.LoRALinear(20, 6, r=2, fan_in_fan_out=True, lora_bias=True, backend=backend),
    ).to(device)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_()
            if layer.lora_bias is not None:
                layer.lora_bias.normal_()
    x = torch.randn(3, 5, 12, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(model, fullgraph=True)
        torch.manual_seed(11)
        out = compiled(x)
        grads = torch.autograd.grad(out.square().sum(), params)
    torch.manual_seed(11)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), params)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    if backend != "reference":  # a new batch size: dynamic shapes through the fakes
        x = torch.randn(2, 9, 12, device=device)
        torch.manual_seed(12)
        out = compiled(x)
        torch.manual_seed(12)
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    if backend == "cpu":  # the serving op compiles too
        t = multi_inputs((6,), 12, 20, [2, 4], torch.float32, torch.float32, device, False)
        f = torch.compile(lambda t: kfuse.lora_linear_multi(**t, backend=backend), fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(f(t), multi_rows(t, False).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", OP_BACKENDS)
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
def test_torch_export(backend: str, device: str, strict: bool, seed: int) -> None:
    """torch.export keeps each LoRA layer as one kfuse.lora_forward node (a dynamic batch size
    stays dynamic: Size.numel() had specialised it), and the program computes what eager does."""
    model = torch.nn.Sequential(kfuse.nn.LoRALinear(8, 6, r=2, lora_dropout=0.1, backend=backend), torch.nn.ReLU(),
                                kfuse.nn.LoRALinear(6, 3, r=4, fan_in_fan_out=True, backend=backend)).to(device).eval()
    with torch.no_grad():
        model[0].lora_B.normal_()
        model[2].lora_B.normal_()
    x = torch.randn(2, 3, 8, device=device)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("B")},), strict=strict)
    calls = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert calls.count("kfuse.lora_forward.default") == 2, calls
    for batch in (x, torch.randn(5, 3, 8, device=device)):
        torch.testing.assert_close(program.module()(batch), model(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", OP_BACKENDS)
def test_compiled_backward_runs_the_kernels(backend: str, device: str, seed: int, backward_calls) -> None:
    """Compiled training and compiled autograd (an eager forward whose backward is traced with
    fullgraph=True) run the backend's backward, not the reference's."""
    calls = backward_calls(ops)
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), kfuse.nn.LoRALinear(6, 5, r=2, lora_dropout=0.1,
                                                                          backend=backend)).to(device)
    x = torch.randn(3, 4, device=device)
    torch.manual_seed(3)
    model(x).square().sum().backward()
    want = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    for run_kind in ("compiled model", "compiled autograd"):
        model.zero_grad()
        calls.update(kernels=0, reference=0)
        torch.manual_seed(3)
        if run_kind == "compiled model":
            torch.compile(model, fullgraph=True)(x).square().sum().backward()
        else:
            loss = model(x).square().sum()
            with torch._dynamo.compiled_autograd._enable(torch.compile(fullgraph=True)):
                loss.backward()
        assert calls == {"kernels": 1, "reference": 0}, (run_kind, calls)
        got = [p.grad for p in model.parameters() if p.requires_grad]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript is deprecated in torch 2.14
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the shape checks, constants in a trace
def test_routes(seed: int) -> None:
    """fx.symbolic_trace records kfuse.lora_linear; make_fx and FakeTensorMode see the
    registered op; a tensor subclass dispatches through it; forward-mode AD, torch.func and
    batched backwards take the reference."""
    import torch.autograd.forward_ad as fwad  # noqa: PLC0415
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415
    from torch.fx.experimental.proxy_tensor import make_fx  # noqa: PLC0415
    from torch.testing._internal.two_tensor import TwoTensor  # noqa: PLC0415

    inp = Inputs((4,), 6, 5, 2, torch.float64, torch.float64, "cpu")
    x, w, a, b = inp.x, inp.weight, inp.A, inp.B

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.a, self.b = (torch.nn.Parameter(t.clone()) for t in (w, a, b))

        def forward(self, x: Tensor) -> Tensor:
            return kfuse.lora_linear(x, self.w, self.a, self.b, 0.5, backend="cpu")

    net = Net()
    graph = torch.fx.symbolic_trace(net)
    assert [n.target for n in graph.graph.nodes if n.op == "call_function"] == [kfuse.lora_linear]
    torch.testing.assert_close(graph(x), net(x))
    # MultiLoRALinear's ids per sequence (the trace dropped the module's expansion of them: export hunt)
    multi = kfuse.nn.MultiLoRALinear(6, 5, dtype=torch.float64, backend="cpu")
    multi.add_adapter(a, b, 0.5)
    x3, seq_ids = torch.randn(2, 3, 6, dtype=torch.float64), torch.tensor([0, -1])
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(multi)(x3, seq_ids), multi(x3, seq_ids))

    g = make_fx(lambda x: kfuse.lora_linear(x, w, a, b, 0.5, backend="cpu"))(x)
    assert "kfuse.lora_forward.default" in [str(n.target) for n in g.graph.nodes if n.op == "call_function"]
    g = make_fx(lambda x, ids: kfuse.lora_linear_multi(x, w, a[None], b[None], torch.ones(1), torch.tensor([2]), ids,
                                                         backend="cpu"))(x, torch.zeros(4, dtype=torch.int64))
    assert "kfuse.lora_multi_forward.default" in [str(n.target) for n in g.graph.nodes if n.op == "call_function"]
    with FakeTensorMode():
        y = kfuse.lora_linear(torch.empty(2, 3, 6), torch.empty(6, 5), torch.empty(2, 6), torch.empty(5, 2), 0.5,
                              dropout_p=0.1, fan_in_fan_out=True, backend="cpu")
    assert y.shape == (2, 3, 5)
    x2 = torch.randn_like(x)
    y = kfuse.lora_linear(TwoTensor(x, x2), w, a, b, 0.5, backend="cpu")
    torch.testing.assert_close(y.b, kfuse.lora_linear(x2, w, a, b, 0.5, backend="cpu"))

    traced = torch.jit.trace(lambda x: kfuse.lora_linear(x, w, a, b, 0.5, backend="cpu"), x)
    assert "kfuse::lora_forward" in str(traced.graph)
    torch.testing.assert_close(traced(x2), kfuse.lora_linear(x2, w, a, b, 0.5, backend="cpu"))

    tx = torch.randn_like(x)
    with fwad.dual_level():
        tangent = fwad.unpack_dual(kfuse.lora_linear(fwad.make_dual(x, tx), w, a, b, 0.5, backend="cpu")).tangent
    want = lora_linear_reference(tx, w, a, b, 0.5)  # linear in x
    torch.testing.assert_close(tangent, want)
    ga = torch.func.grad(lambda a: kfuse.lora_linear(x, w, a, b, 0.5, backend="cpu").square().sum())(a)
    torch.testing.assert_close(ga, torch.func.grad(lambda a: lora_linear_reference(x, w, a, b, 0.5).square().sum())(a))

    def f(a: Tensor) -> Tensor:
        return kfuse.lora_linear(x, w, a, b, 0.5, backend="cpu")

    torch.testing.assert_close(torch.autograd.functional.jacobian(f, a, vectorize=True),
                               torch.autograd.functional.jacobian(f, a))


def test_registered_ops_check_backend(seed: int, monkeypatch) -> None:
    """torch.ops.kfuse.* are public: a bogus backend string raises ValueError (at trace time too),
    and "reference" runs the reference."""
    inp = Inputs((4,), 6, 5, 2, torch.float32, torch.float32, "cpu")
    args = (inp.x, inp.weight, inp.A, inp.B, 0.5, inp.bias, inp.lora_bias, 0.0, False)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        torch.ops.kfuse.lora_forward(*args, "bogus")
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    with FakeTensorMode(), pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        torch.ops.kfuse.lora_forward(torch.empty(2, 6), torch.empty(5, 6), torch.empty(2, 6), torch.empty(5, 2), 0.5,
                                     None, None, 0.0, False, "bogus")
    y, S, seed_t = torch.ops.kfuse.lora_forward(*args, "cpu")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        torch.ops.kfuse.lora_backward(torch.ones_like(y), inp.x, inp.weight, inp.A, inp.B, 0.5, S, seed_t, 0.0, False,
                                      *(True,) * 6, "bogus")
    t = multi_inputs((3,), 6, 5, [2], torch.float32, torch.float32, "cpu", False)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        torch.ops.kfuse.lora_multi_forward(*t.values(), False, "fast")
    with pytest.raises(kfuse.BackendUnavailableError, match="no CUDA .csrc. kernels"):
        torch.ops.kfuse.lora_forward(*args, "cuda")

    calls = []
    real = ops.lora_linear_reference
    monkeypatch.setattr(ops, "lora_linear_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    y_ref = torch.ops.kfuse.lora_forward(*args, "reference")[0]
    assert calls == [1]
    assert_close(y_ref, y, torch.float32, "reference vs cpu")
    x = inp.x.clone().requires_grad_()
    gx = torch.autograd.grad(torch.ops.kfuse.lora_forward(x, *args[1:], "reference")[0].sum(), x)[0]
    assert_close(gx, torch.autograd.grad(kfuse.lora_linear(x, *args[1:5], backend="cpu").sum(), x)[0],
                 torch.float32, "reference backward")


def test_backend_choice() -> None:
    x = torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto on CPU is the cpu backend, no fallback warning
        kfuse.lora_linear(x, torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2), 1.0)
    assert backend_reasons(x)["cpu"] == [] and backend_reasons(x)["reference"] == []
    assert backend_reasons(x.double())["triton"][-1] == "the Triton LoRA kernels do not support float64"
    assert backend_reasons(x)["cuda"], "LoRA has no csrc kernels"
    with pytest.raises(kfuse.BackendUnavailableError, match="backend 'cuda' cannot run this input: kfuse has no CUDA"):
        kfuse.lora_linear(x, torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2), 1.0, backend="cuda")
    with pytest.raises(kfuse.BackendUnavailableError, match="float64"):
        kfuse.lora_linear(x.double(), torch.randn(5, 4).double(), torch.randn(2, 4), torch.randn(5, 2), 1.0,
                          backend="triton")
    assert _backends.select_for("lora_linear", "auto", x.device, x.dtype, lambda: backend_reasons(x),
                                ops._ORDER["cpu"]) == "cpu"


def test_bad_input_errors() -> None:
    x, w, a, b = torch.randn(4, 6), torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2)
    f = kfuse.lora_linear
    cases = [
        (lambda: f(x, w, torch.randn(2, 7), b, 1.0), ValueError, r"lora_A must have shape \[r, K\] = \[r, 6\]"),
        (lambda: f(x, w, torch.randn(0, 6), torch.randn(5, 0), 1.0), ValueError, "lora_A .* r >= 1"),
        (lambda: f(x, w, a, torch.randn(5, 3), 1.0), ValueError, r"lora_B must have shape \[N, r\] = \[5, 2\]"),
        (lambda: f(x, w, a, torch.randn(4, 2), 1.0), ValueError, "lora_B must have shape"),
        (lambda: f(x, torch.randn(5, 7), a, b, 1.0), ValueError, r"weight must have shape \[N, K\] = \[N, 6\]"),
        (lambda: f(x, w, a, b, 1.0, fan_in_fan_out=True), ValueError, r"weight must have shape \[K, N\] = \[6, N\]"),
        (lambda: f(x, w, a, b, 1.0, bias=torch.randn(4)), ValueError, r"bias must have shape \[N\] = \[5\]"),
        (lambda: f(x, w, a, b, 1.0, lora_bias=torch.randn(5, 1)), ValueError, r"lora_bias must have shape \[N\]"),
        (lambda: f(x, w, a, b, 1.0, dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\); got 1.0"),
        (lambda: f(x, w, a, b, 1.0, dropout_p=-0.1), ValueError, "dropout_p must be in"),
        (lambda: f(x, w, a, b, 1.0, dropout_p=math.nan), ValueError, "dropout_p must be in"),
        (lambda: f(x, w, a, b, 1.0, dropout_p="0.1"), TypeError, "dropout_p must be a real number; got str"),
        (lambda: f(x, w, a, b, torch.tensor(1.0)), TypeError, "scaling must be a real number; got torch.Tensor"),
        (lambda: f(x, w, a, b, True), TypeError, "scaling must be a real number; got bool"),
        (lambda: f(x, w, a, b, 1.0, training=1), TypeError, "training must be a bool"),
        # numpy 2 calls its bool "bool": the message says whose (it said "must be a bool; got bool").
        (lambda: f(x, w, a, b, 1.0, training=np.True_), TypeError, "training must be a bool; got numpy.bool"),
        (lambda: f(x, w, a, b, 10**400), ValueError, "scaling is out of float's range"),  # was a bare OverflowError
        (lambda: f(x, w, a, b, 1.0, dropout_p=10**400), ValueError, "dropout_p is out of float's range"),
        (lambda: f(x, w, a, b, 1.0, fan_in_fan_out=None), TypeError, "fan_in_fan_out must be a bool"),
        (lambda: f(x.numpy(), w, a, b, 1.0), TypeError, "x must be a torch.Tensor; got ndarray"),
        (lambda: f(x, w, [1.0], b, 1.0), TypeError, "lora_A must be a torch.Tensor; got list"),
        (lambda: f(x, w, a, b, 1.0, bias=3.0), TypeError, "bias must be a torch.Tensor or None; got float"),
        (lambda: f(x.to_sparse(), w, a, b, 1.0), TypeError, r"x must be a dense \(strided\) tensor"),
        (lambda: f(x.long(), w.long(), a, b, 1.0), TypeError, "x must be float16, bfloat16, float32 or float64"),
        (lambda: f(x, w.half(), a, b, 1.0), TypeError, r"weight must have x's dtype \(torch.float32\)"),
        (lambda: f(x.half(), w.half(), a.double(), b.double(), 1.0), TypeError,
         r"lora_A must be float32 or x's dtype \(torch.float16\); got torch.float64"),
        (lambda: f(x.half(), w.half(), a, b.half(), 1.0), TypeError, "lora_B must have lora_A's dtype"),
        (lambda: f(x, w, a, b, 1.0, bias=torch.randn(5).double()), TypeError, "bias must have x's dtype"),
        (lambda: f(x.half(), w.half(), a, b, 1.0, lora_bias=torch.randn(5).half()), TypeError,
         "lora_bias must have lora_A's dtype"),
        (lambda: f(x, w, a.to("meta"), b, 1.0), ValueError, "lora_A is on meta but x is on cpu"),
        (lambda: f(torch.tensor(1.0), w, a, b, 1.0), ValueError, "x must have at least one dimension"),
        (lambda: f(x, w, a, b, 1.0, backend="fast"), ValueError, "backend must be 'auto' or one of"),
        (lambda: f(x, w, a, b, 1.0, backend=["cpu"]), TypeError, "backend must be a str"),
    ]
    m = multi_inputs((4,), 6, 5, [2, 3], torch.float32, torch.float32, "cpu", False)
    g = kfuse.lora_linear_multi

    def multi(**over: object) -> Tensor:
        return g(**{**m, **over})

    cases += [
        (lambda: multi(adapter_ids=torch.tensor([0, 1, 2, -1])), IndexError,
         r"adapter_ids must be in \[-1, L\) = \[-1, 2\) .*got values in \[-1, 2\]"),
        (lambda: multi(adapter_ids=torch.tensor([0, -2, 1, 1])), IndexError, "adapter_ids must be in"),
        (lambda: multi(adapter_ids=torch.tensor([0, 1, 1])), ValueError, "adapter_ids must hold one id per row"),
        (lambda: multi(adapter_ids=torch.zeros(4)), TypeError, "adapter_ids must be int32 or int64"),
        (lambda: multi(ranks=torch.tensor([2, 4], dtype=torch.int32)), ValueError,
         r"ranks must be in \[0, r_max\] = \[0, 3\]"),
        (lambda: multi(ranks=torch.tensor([2.0, 3.0])), TypeError, "ranks must be int32 or int64"),
        (lambda: multi(ranks=torch.tensor([2])), ValueError, r"ranks must have shape \[L\] = \[2\]"),
        (lambda: multi(scalings=torch.ones(3)), ValueError, r"scalings must have shape \[L\] = \[2\]"),
        (lambda: multi(scalings=torch.ones(2, dtype=torch.int64)), TypeError, "scalings must be a floating tensor"),
        (lambda: multi(A_stack=torch.randn(2, 3, 7)), ValueError, r"A_stack must have shape \[L, r_max, K\]"),
        (lambda: multi(B_stack=torch.randn(2, 5, 4)), ValueError,
         r"B_stack must have shape \[L, N, r_max\] = \[2, 5, 3\]"),
        (lambda: multi(B_stack=m["B_stack"].double()), TypeError, "B_stack must have A_stack's dtype"),
        (lambda: multi(adapter_ids=m["adapter_ids"].to("meta")), ValueError, "adapter_ids is on meta but x is on cpu"),
        (lambda: multi(bias=torch.randn(4)), ValueError, r"bias must have shape \[N\] = \[5\]"),
        # The modules' scalars, by the same checks.
        (lambda: kfuse.nn.LoRALinear(6, 5, lora_alpha=10**400), ValueError, "LoRALinear: lora_alpha is out of float"),
        (lambda: kfuse.nn.LoRALinear(6, 5, use_rslora=np.True_), TypeError,
         "LoRALinear: use_rslora must be a bool; got numpy.bool"),
        # bias and freeze_base too: the string "False" was taken as True (docstring bug hunt).
        (lambda: kfuse.nn.LoRALinear(6, 5, bias="False"), TypeError, "LoRALinear: bias must be a bool; got str"),
        (lambda: kfuse.nn.MultiLoRALinear(6, 5, bias="False"), TypeError, "MultiLoRALinear: bias must be a bool"),
        (lambda: kfuse.nn.LoRALinear.from_linear(torch.nn.Linear(6, 5), freeze_base="False"), TypeError,
         "LoRALinear.from_linear: freeze_base must be a bool; got str 'False'"),
        (lambda: kfuse.nn.LoRALinear(6.0, 5), TypeError, "LoRALinear: in_features must be an int; got float"),
        (lambda: kfuse.nn.MultiLoRALinear(6, 5).add_adapter(a, b, 10**400), ValueError,
         "add_adapter: scaling is out of float's range"),
        (lambda: kfuse.nn.MultiLoRALinear(6, 5).add_adapter(a.to(torch.complex64), b, 1.0), TypeError,
         "add_adapter: lora_A must be a floating-point tensor; got torch.complex64"),
    ]
    for i, (call, exc, match) in enumerate(cases):
        with pytest.raises(exc, match=match):
            call()
            pytest.fail(f"case {i} raised nothing")
    # A lazily negated view is read as its values.
    torch.testing.assert_close(f(x._neg_view(), w, a, b, 1.0, backend="cpu"), f(-x, w, a, b, 1.0, backend="cpu"))


# ---------------------------------------------------------------- the Triton kernels, launcher by launcher
# LoRA Triton kernels (triton_kernels/lora.py): every launcher against float64 torch formulas.
#
# Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1 before Triton is imported) on tiny odd shapes, in fp32 and fp16 (the
# interpreter is wrong for bf16); with a GPU the same tests run compiled ('-cuda' ids), with bf16
# and larger shapes too. The dropout mask in every reference comes from ``lora_dropout_mask``
# (the mask function the kernels share), so matching the reference shows that the forward and
# the backward both apply exactly that mask.

# (device, x dtype, adapter dtype): fp32 adapters with half x is PEFT's default; adapters in x's
# dtype the other common case. bf16 only on the GPU (the interpreter gets bf16 wrong).
_COMBOS = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)]
_GPU_COMBOS = _COMBOS + [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


def _name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


DTYPES = [pytest.param("cpu", x, a, marks=pytest.mark.interpret, id=f"interp-{_name(x)}-A{_name(a)}")
          for x, a in _COMBOS]
DTYPES += [pytest.param("cuda", x, a, marks=pytest.mark.cuda, id=f"cuda-{_name(x)}-A{_name(a)}")
           for x, a in _GPU_COMBOS]
DEVICES = [pytest.param("cpu", marks=pytest.mark.interpret, id="interp"),
           pytest.param("cuda", marks=pytest.mark.cuda, id="cuda")]

# Shapes: odd sizes (not multiples of any block), M spanning the decode path and several row
# tiles; r = 1 (padded to 16), 8, 16, 20 (not a power of 2), 64. The GPU adds shapes that fill
# its larger tiles. (M, K, N, r, fan_in_fan_out, bias, lora_bias, p)
SHAPES = [
    (1, 19, 23, 1, False, False, False, 0.0),
    (3, 40, 33, 8, True, True, False, 0.3),
    (37, 19, 33, 16, False, True, True, 0.3),
    (37, 40, 23, 20, True, False, True, 0.0),
    (5, 40, 33, 64, False, True, True, 0.3),
]
GPU_SHAPES = [
    (64, 520, 264, 16, False, True, True, 0.1),
    (300, 264, 520, 16, True, True, False, 0.3),
    (1024, 1000, 777, 8, False, True, True, 0.0),
]


def _case_params() -> list:
    """(device, x dtype, adapter dtype, shape) for every combination the device runs."""
    out = []
    for dev, mark, combos, shapes in (("cpu", pytest.mark.interpret, _COMBOS, SHAPES),
                                      ("cuda", pytest.mark.cuda, _GPU_COMBOS, SHAPES + GPU_SHAPES)):
        tag = "interp" if dev == "cpu" else "cuda"
        for x, a in combos:
            for i, shape in enumerate(shapes):
                out.append(pytest.param(dev, x, a, shape, marks=mark, id=f"{tag}-{_name(x)}-A{_name(a)}-{i}"))
    return out


KERNEL_CASES = _case_params()


def rand(shape: tuple[int, ...], dtype: torch.dtype, device: str, scale: float = 1.0) -> Tensor:
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def make_seed(value: int, device: str) -> Tensor:
    return torch.tensor([value], dtype=torch.int64, device=device)


def make_layer(M, K, N, r, fifo, has_bias, has_lbias, dtype, a_dtype, device):
    """x [M, K], weight ([K, N] if fifo else [N, K]), A [r, K] (non-contiguous: a transposed
    [K, r], to exercise the strides), B [N, r], bias, lora_bias."""
    x = rand((M, K), dtype, device)
    weight = rand((K, N) if fifo else (N, K), dtype, device, 0.5)
    A = rand((K, r), a_dtype, device, 0.5).t()
    B = rand((N, r), a_dtype, device, 0.5)
    bias = rand((N,), dtype, device) if has_bias else None
    lbias = rand((N,), a_dtype, device) if has_lbias else None
    return x, weight, A, B, bias, lbias


def w_nk(weight: Tensor, fifo: bool) -> Tensor:
    return (weight.t() if fifo else weight).double()


def _d(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.double().cpu()


def ref_forward(x, weight, fifo, A, B, s, bias, lbias, keep, p) -> tuple[Tensor, Tensor]:
    """(y, S) in float64 from the same (rounded) inputs; ``keep`` bool [M, K] or None."""
    x64 = _d(x)
    xd = x64 if keep is None else x64 * keep.cpu() / (1.0 - p)
    S = xd @ _d(A).t()
    y = x64 @ w_nk(weight, fifo).cpu().t() + s * (S @ _d(B).t())
    if bias is not None:
        y = y + _d(bias)
    if lbias is not None:
        y = y + s * _d(lbias)
    return y, S


def ref_backward(dy, x, weight, fifo, A, B, s, keep, p) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, colsum) in float64."""
    dy64, x64 = _d(dy), _d(x)
    xd = x64 if keep is None else x64 * keep.cpu() / (1.0 - p)
    G = dy64 @ _d(B)
    low = s * (G @ _d(A))
    if keep is not None:
        low = low * keep.cpu() / (1.0 - p)
    dx = dy64 @ w_nk(weight, fifo).cpu() + low
    dA = s * G.t() @ xd
    dB = s * dy64.t() @ (xd @ _d(A).t())
    return dx, dA, dB, dy64.sum(0)


def absolute(*ts):
    return [None if t is None else t.abs() for t in ts]


def assert_sum_close(got: Tensor, want: Tensor, mag: Tensor, dtype: torch.dtype, what: str) -> None:
    """``|got - want| <= atol·max(1, max Σ|terms|) + rtol·|want|`` with tests/tolerances.py's
    (atol, rtol) for ``dtype``. tolerances.assert_close scales atol by the largest |expected|;
    the rounding error of a dot product scales with the sum of its terms' magnitudes instead,
    which exceeds the result wherever terms cancel (about √K times for random signs). ``mag``
    is the same formula evaluated on absolute values: that sum, elementwise."""
    atol, rtol = TOL[dtype]
    g, w, m = got.detach().double().cpu(), want.double(), mag.double()
    assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)} != {tuple(w.shape)}"
    assert torch.isfinite(g).all(), f"{what}: non-finite values"
    scale = max(1.0, m.max().item()) if m.numel() else 1.0
    err = (g - w).abs()
    bad = err > atol * scale + rtol * w.abs()
    if bad.any():
        i = int(torch.nonzero(bad.flatten())[0])
        raise AssertionError(f"{what}: {int(bad.sum())}/{w.numel()} elements off; max err {err.max().item():.3e} "
                             f"(scale {scale:.3e}, {dtype}); first at flat index {i}: got "
                             f"{g.flatten()[i].item():.9g}, expected {w.flatten()[i].item():.9g}")


def keep_for(seed: Tensor | None, M: int, K: int, p: float) -> Tensor | None:
    return None if seed is None or p == 0 else lk.lora_dropout_mask(seed, M, K, p)


# ----------------------------------------------------------------------------------------
# The dropout mask.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_statistics_and_seeds(device: str) -> None:
    """Keep fraction ≈ 1 - p; same seed → same mask, another seed → another; p = 0 keeps all;
    row m depends on m and K only (not on M); the four columns of one Philox call are independent."""
    M, K, p = 64, 300, 0.3
    m1 = lk.lora_dropout_mask(make_seed(1234, device), M, K, p)
    assert m1.dtype == torch.bool and m1.shape == (M, K) and m1.device.type == device
    frac = m1.float().mean().item()
    assert abs(frac - (1 - p)) < 0.02, frac  # σ = 0.0033
    # Rows and columns are not degenerate (no constant rows/columns, e.g. from a bad offset).
    assert 0.4 < m1.float().mean(1).min().item() and m1.float().mean(1).max().item() < 0.95
    assert 0.3 < m1.float().mean(0).min().item()
    assert torch.equal(m1, lk.lora_dropout_mask(make_seed(1234, device), M, K, p))
    m2 = lk.lora_dropout_mask(make_seed(1235, device), M, K, p)
    differ = (m1 != m2).float().mean().item()
    assert 0.35 < differ < 0.49, differ  # independent masks differ in 2p(1-p) = 42 %
    assert lk.lora_dropout_mask(make_seed(1234, device), M, K, 0.0).all()
    assert torch.equal(lk.lora_dropout_mask(make_seed(1234, device), 5, K, p), m1[:5])
    # Columns 4j .. 4j + 3 come from the four words of one Philox call: a word used twice would make
    # two of them equal everywhere; independent ones agree in p² + (1 − p)² = 58 %.
    for a in range(4):
        for b in range(a + 1, 4):
            agree = (m1[:, a::4][:, :K // 4] == m1[:, b::4][:, :K // 4]).float().mean().item()
            assert 0.5 < agree < 0.66, (a, b, agree)
    # A higher p drops a superset: the mask is rand >= p on the same uniform numbers.
    m_hi = lk.lora_dropout_mask(make_seed(1234, device), M, K, 0.6)
    assert not (m_hi & ~m1).any()


def philox_keep(seed: int, M: int, K: int, p: float) -> Tensor:
    """The mask ``lora_dropout_mask`` documents, computed independently (numpy Philox4x32-10, Triton's
    constants and its uint → [0, 1) conversion): keep[m, k] = u(word k % 4 of Philox(seed,
    m·⌈K/4⌉ + k // 4)) >= p."""
    return torch.from_numpy(philox_uniform(seed, M, K) >= np.float32(p))


def philox_uniform(seed: int, M: int, K: int) -> np.ndarray:
    """The float32 ``[M, K]`` uniforms of :func:`philox_keep`."""
    mask32 = np.uint64(0xFFFFFFFF)
    ctr = (np.arange(M, dtype=np.uint64)[:, None] * np.uint64((K + 3) // 4)
           + np.arange((K + 3) // 4, dtype=np.uint64)[None, :])
    c = [ctr & mask32, ctr >> np.uint64(32), np.zeros_like(ctr), np.zeros_like(ctr)]
    k0, k1 = np.uint64(seed) & mask32, np.uint64(seed) >> np.uint64(32)
    ra, rb = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        p0, p2 = rb * c[2], ra * c[0]  # 64-bit products of two 32-bit words
        c = [(p0 >> np.uint64(32)) ^ c[1] ^ k0, p0 & mask32, (p2 >> np.uint64(32)) ^ c[3] ^ k1, p2 & mask32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask32, (k1 + np.uint64(0xBB67AE85)) & mask32
    words = np.stack(c, axis=-1).reshape(M, -1)[:, :K].astype(np.uint32).view(np.int32)
    return np.where(words < 0, ~words, words).astype(np.float32) * np.float32(4.6566127342e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,K", [(3, 8), (5, 37), (2, 130)])
def test_dropout_mask_is_the_documented_philox_draw(device: str, M: int, K: int) -> None:
    """The kernels' mask against an independent numpy Philox: pins the counter and word layout (a
    kernel with another layout, or words interleaved in another order, fails here)."""
    for seed, p in ((1234, 0.3), (2**40 + 17, 0.5)):
        got = lk.lora_dropout_mask(make_seed(seed, device), M, K, p).cpu()
        assert torch.equal(got, philox_keep(seed, M, K, p)), (seed, p)


@pytest.mark.skipif(_backends.extension() is None, reason="kfuse._C is not built")
@pytest.mark.parametrize("M,K", [(1, 1), (3, 8), (5, 37), (70, 67), (300, 130), (3, 513)])
def test_cpu_backend_mask_is_the_triton_draw(M: int, K: int, monkeypatch) -> None:
    """The cpu backend's mask (``_C.lora_dropout_keep``) is the documented Philox draw the Triton kernels make, at
    any thread count (rows split across threads; 300 x 130 takes two), and p near 0 and 1 (the kernel compares
    integers against a threshold found once: an off-by-one there flips elements at the boundary). Without the
    extension the cpu backend draws as the reference backend does."""
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for seed, p in ((1234, 0.3), (2**40 + 17, 0.5), (2**62 - 1, 1e-9), (7, 0.999999), (0, 0.1)):
                got = dropout_mask(torch.tensor([seed]), M, K, p, "cpu")
                assert got.dtype == torch.bool and torch.equal(got, philox_keep(seed, M, K, p)), (threads, seed, p)
    finally:
        torch.set_num_threads(old)
    # p exactly at elements' own uniforms: each is kept (u >= p), the next smaller ones dropped
    u = philox_uniform(99, 64, 64)
    for i in (0, 777, 4095):
        p = float(np.sort(u, axis=None)[i])
        got = dropout_mask(torch.tensor([99]), 64, 64, p, "cpu")
        assert torch.equal(got, philox_keep(99, 64, 64, p)) and int((~got).sum()) == i
    monkeypatch.setattr(_backends, "extension", lambda: None)
    seed = torch.tensor([1234])
    assert torch.equal(dropout_mask(seed, 20, 30, 0.4, "cpu"), dropout_mask(seed, 20, 30, 0.4, "reference"))


@pytest.mark.parametrize("M,r", [(70, 4), (70, 2), (70, 8), (70, 16), (70, 1), (5, 4)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cpu_backward_both_gemm_layouts(M: int, r: int, p: float, seed: int) -> None:
    """The cpu backend's backward takes dy B and dyᵀ S in the layout MKL is fast at (transposed rank-r matrix for
    2 <= r <= 8 from 64 rows: ops._SKINNY_RANKS, _SKINNY_MIN_M) or as written: both against the float64 reference,
    dB contiguous [N, r] in B's dtype either way."""
    torch.manual_seed(seed)
    K, N = 19, 33
    x, w, A, B, _, _ = make_layer(M, K, N, r, True, False, False, torch.float32, torch.float32, "cpu")
    dy = rand((M, N), torch.float32, "cpu")
    sd = make_seed(seed, "cpu") if p else None
    keep = None if sd is None else dropout_mask(sd, M, K, p, "cpu")
    S = ref_forward(x, w, True, A, B, 0.5, None, None, keep, p)[1].float()
    dx, _, dA, dB, _, _ = ops._torch_backward(dy, x, w, A, B, 0.5, S, sd, p, True,
                                              (True, False, True, True, False, False))
    want = ref_backward(dy, x, w, True, A, B, 0.5, keep, p)
    for got, ref, name in ((dx, want[0], "dx"), (dA, want[1], "dA"), (dB, want[2], "dB")):
        assert_close(got, ref, torch.float32, name)
    assert dB.is_contiguous() and dB.shape == (N, r) and dB.dtype == B.dtype
    assert (M >= ops._SKINNY_MIN_M and r in ops._SKINNY_RANKS) == (r in (2, 4, 8) and M == 70)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cpu_backend_dropout_leaves_inputs_unchanged(dtype: torch.dtype, seed: int) -> None:
    """The cpu backend masks in place only what it made itself (x's float copy for half x, the backward's G·A): x
    (float32/float64: the very tensor the products read), the weights and dy are bit-identical after a forward and a
    backward with dropout (a mask applied to x in place would not show in the gradients: the backward masks it
    again, to the same values)."""
    torch.manual_seed(seed)
    x = torch.randn(37, 19).to(dtype).requires_grad_()
    w, A, B = torch.randn(11, 19).to(dtype), torch.randn(4, 19).requires_grad_(), torch.randn(11, 4).requires_grad_()
    gy = torch.randn(37, 11).to(dtype)
    before = [t.detach().clone() for t in (x, w, A, B, gy)]
    y = kfuse.lora_linear(x, w, A, B, 0.5, dropout_p=0.5, backend="cpu")
    torch.autograd.grad(y, (x, A, B), gy)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, (x, w, A, B, gy), strict=True))


@pytest.mark.skipif(_backends.extension() is None, reason="kfuse._C is not built")
@pytest.mark.parametrize("M,K", [(1, 1), (5, 37), (300, 130), (3, 513)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_backend_dropout_product(M: int, K: int, dtype: torch.dtype, monkeypatch) -> None:
    """The cpu backend's dropout products (``_C.lora_dropout_mul``: the mask made row by row inside them, once for
    all) are ``t * mask`` with the Philox mask, exactly: at 1-3 threads, one tensor or two (the backward's pair, one
    in place), for a transposed (non-contiguous) input, and a NaN or inf in a dropped element gives NaN as the
    product with the mask does. Without the extension the same products come from the mask tensor."""
    g = torch.Generator().manual_seed(M * K)
    t, t2 = torch.randn(2, M, K, generator=g, dtype=dtype)
    t.view(-1)[::7] = float("nan")
    t.view(-1)[3::11] = float("inf")
    seed, p = torch.tensor([2**40 + 17]), 0.3
    keep = philox_keep(int(seed), M, K, p).to(dtype)
    want, want2 = (t * keep).nan_to_num(), t2 * keep

    def same(got: Tensor, want: Tensor) -> bool:
        return got.dtype == dtype and torch.equal(got.nan_to_num(), want)

    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            (got,) = ops._dropout_mul(seed, p, [t], [False])
            assert same(got, want) and torch.equal(got.isnan(), (t * keep).isnan()), threads
            inplace = t2.clone()
            got, got2 = ops._dropout_mul(seed, p, [t, inplace], [False, True])
            assert same(got, want) and same(got2, want2) and got2 is inplace, threads
    finally:
        torch.set_num_threads(old)
    tt = t.t().contiguous().t()  # t's values, column-major
    assert same(ops._dropout_mul(seed, p, [tt], [False])[0], want)
    monkeypatch.setattr(_backends, "extension", lambda: None)
    keep = dropout_mask(seed, M, K, p, "reference")
    got, got2 = ops._dropout_mul(seed, p, [t, t2.clone()], [False, True])
    assert same(got, (t * keep).nan_to_num()) and same(got2, t2 * keep)


# ----------------------------------------------------------------------------------------
# S = dropout(x) Aᵀ.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,dtype,a_dtype", DTYPES)
@pytest.mark.parametrize("M,K,r,p", [(1, 19, 1, 0.0), (37, 40, 16, 0.3), (37, 19, 20, 0.3)])
def test_shrink(device, dtype, a_dtype, M, K, r, p, seed) -> None:
    x, _, A, _, _, _ = make_layer(M, K, 4, r, False, False, False, dtype, a_dtype, device)
    sd = make_seed(seed, device)
    S = lk.lora_shrink(x, A, sd, p)
    assert S.dtype == torch.float32 and S.shape == (M, r) and S.is_contiguous()
    keep = keep_for(sd, M, K, p)
    xd = _d(x) if keep is None else _d(x) * keep.cpu() / (1 - p)
    xa = _d(x).abs() if keep is None else _d(x).abs() * keep.cpu() / (1 - p)
    assert_sum_close(S, xd @ _d(A).t(), xa @ _d(A).abs().t(), dtype, "S")
    if p > 0:  # seed None means no dropout, whatever p
        assert_sum_close(lk.lora_shrink(x, A, None, p), _d(x) @ _d(A).t(), _d(x).abs() @ _d(A).abs().t(), dtype,
                         "S without seed")


# ----------------------------------------------------------------------------------------
# Forward: both paths (split-K decode, shrink + GEMM) on every shape.
# ----------------------------------------------------------------------------------------
@pytest.fixture(params=["splitk", "gemm", "gemm-tma", "cublas"])
def fwd_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Forces lora_forward's path: the split-K decode path for any M, or shrink + GEMM for any M (with
    x and W read by TMA where their layouts allow, "gemm-tma"), or shrink + cuBLAS's x Wᵀ + the update pass
    for any M and dtype ("cublas"; by default bf16 at M >= _CUBLAS_MIN_M)."""
    monkeypatch.setattr(lk, "_SMALL_M", 1 << 30 if request.param == "splitk" else -1)
    monkeypatch.setattr(lk, "_TMA", request.param == "gemm-tma")
    monkeypatch.setattr(lk, "_CUBLAS_MIN_M", 0 if request.param == "cublas" else 1 << 30)
    monkeypatch.setattr(lk, "_CUBLAS_DTYPES", lk._FLOATS)
    return request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fifo", [False, True])
def test_forward_takes_cublas_where_it_reads_w_in_place(device, fifo, monkeypatch, seed) -> None:
    """At M >= _CUBLAS_MIN_M, bf16 x (the default _CUBLAS_DTYPES; widened to fp16 here, which the interpreter
    runs) takes cuBLAS's x Wᵀ and _fwd_update_kernel where W or Wᵀ is contiguous, and _fwd_kernel's GEMM for
    another layout (every other column of a wider W) or another dtype; both match the reference. A slice of a
    wider W (its leading dimension) is read in place too. The backward's dx likewise (cuBLAS's dy W and
    _bwd_dx_kernel's CUBLAS pass), with and without dropout. The launcher takes inputs that require grad (mm's
    out= refused them: review)."""
    taken = []

    def spy(name):
        real = getattr(lk, name)

        class Spy:
            def __getitem__(self, grid):
                return lambda *args, **kw: (taken.append(name), real[grid](*args, **kw))
        monkeypatch.setattr(lk, name, Spy())

    spy("_fwd_kernel")
    spy("_fwd_update_kernel")
    dx_real, dx_cublas = lk._bwd_dx_kernel, []

    class DxSpy:
        def __getitem__(self, grid):
            return lambda *args, **kw: (dx_cublas.append(kw["CUBLAS"]), dx_real[grid](*args, **kw))
    monkeypatch.setattr(lk, "_bwd_dx_kernel", DxSpy())
    monkeypatch.setattr(lk, "_SMALL_M", -1)
    monkeypatch.setattr(lk, "_CUBLAS_MIN_M", 8)
    for dtypes, layout, want in ((lk._FLOATS, "", "_fwd_update_kernel"), (lk._FLOATS, "::2", "_fwd_kernel"),
                                 (lk._FLOATS, ":n", "_fwd_update_kernel"), ((torch.bfloat16,), "", "_fwd_kernel")):
        monkeypatch.setattr(lk, "_CUBLAS_DTYPES", dtypes)
        x, weight, A, B, bias, lbias = make_layer(37, 40, 24, 8, fifo, True, True, torch.float16, torch.float32,
                                                  device)
        if layout:  # every other column of a twice-as-wide W (no unit stride), or its first half (a slice)
            wide = torch.zeros(weight.shape[0], 2 * weight.shape[1], dtype=weight.dtype, device=device)
            view = wide[:, ::2] if layout == "::2" else wide[:, :weight.shape[1]]
            view.copy_(weight)
            weight = view
        weight.requires_grad_()
        taken.clear()
        y, S = lk.lora_forward(x, weight, fifo, A, B, 0.5, bias, lbias, None, 0.0, True)
        assert taken == [want], (dtypes, layout, taken)
        y_ref, S_ref = ref_forward(x, weight, fifo, A, B, 0.5, bias, lbias, None, 0.0)
        y_mag, S_mag = ref_forward(*absolute(x, weight), fifo, *absolute(A, B), 0.5, *absolute(bias, lbias), None,
                                   0.0)
        assert_sum_close(y, y_ref, y_mag, torch.float16, f"y ({want})")
        assert_sum_close(S, S_ref, S_mag, torch.float16, f"S ({want})")
        for p in (0.0, 0.3):  # the backward's dx likewise
            sd = make_seed(seed, device) if p else None
            S = lk.lora_forward(x, weight, fifo, A, B, 0.5, bias, lbias, sd, p, True)[1]
            dy = rand((37, weight.shape[1] if fifo else weight.shape[0]), torch.float16, device)
            dx_cublas.clear()
            dx, dA = lk.lora_backward(dy, x, weight, fifo, A, B, 0.5, S, sd, p, True, True, False, False)[:2]
            assert dx_cublas == [want == "_fwd_update_kernel"], (dtypes, layout, p, dx_cublas)
            keep = keep_for(sd, 37, 40, p)
            grads = ref_backward(dy, x, weight, fifo, A, B, 0.5, keep, p)
            mags = ref_backward(*absolute(dy, x, weight), fifo, *absolute(A, B), 0.5, keep, p)
            assert_sum_close(dx, grads[0], mags[0], torch.float16, f"dx ({want}, p {p})")
            assert_sum_close(dA, grads[1], mags[1], torch.float16, f"dA ({want}, p {p})")
    monkeypatch.setattr(lk, "_CUBLAS_DTYPES", lk._FLOATS)
    taken.clear()
    lk.lora_forward(x[:7], weight, fifo, A, B, 0.5, bias, lbias, None, 0.0, True)  # below _CUBLAS_MIN_M
    assert taken == ["_fwd_kernel"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fifo", [False, True])
def test_forward_reads_by_tma_where_the_layouts_allow(device, fifo, monkeypatch, seed) -> None:
    """With _TMA set, 16-byte aligned rows take _fwd_kernel's TMA variant (odd M, partial K and N boxes) and
    match the pointer loads; a row of 38 bytes (K = 19, fp16) and a broadcast weight row (stride 0) fall
    back to them."""
    taken = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kw: (kw["TMA"] and taken.append(grid), real[grid](*args, **kw))

    real = lk._fwd_kernel
    monkeypatch.setattr(lk, "_fwd_kernel", Spy())
    monkeypatch.setattr(lk, "_SMALL_M", -1)
    for K, tma in ((40, True), (19, False), (-40, False)):
        x, weight, A, B, bias, lbias = make_layer(37, abs(K), 24, 8, fifo, True, True, torch.float16, torch.float32,
                                                  device)
        if K < 0:  # one row of the weight, broadcast (stride 0 along the rows)
            weight = weight[:1].expand(weight.shape)
        monkeypatch.setattr(lk, "_TMA", False)
        y0, S0 = lk.lora_forward(x, weight, fifo, A, B, 0.5, bias, lbias, None, 0.0, True)
        monkeypatch.setattr(lk, "_TMA", True)
        taken.clear()
        y1, S1 = lk.lora_forward(x, weight, fifo, A, B, 0.5, bias, lbias, None, 0.0, True)
        assert bool(taken) == tma, (K, taken)
        assert torch.equal(S1, S0)
        y_ref, _ = ref_forward(x, weight, fifo, A, B, 0.5, bias, lbias, None, 0.0)
        y_mag, _ = ref_forward(*absolute(x, weight), fifo, *absolute(A, B), 0.5, *absolute(bias, lbias), None, 0.0)
        assert_sum_close(y1, y_ref, y_mag, torch.float16, f"y (K {K}, TMA {tma})")
        torch.testing.assert_close(y1, y0, rtol=0, atol=1e-6 * y_mag.max().item())


@pytest.mark.parametrize("device,dtype,a_dtype,shape", KERNEL_CASES)
def test_forward(device, dtype, a_dtype, shape, fwd_path, seed) -> None:
    M, K, N, r, fifo, has_bias, has_lbias, p = shape
    x, weight, A, B, bias, lbias = make_layer(M, K, N, r, fifo, has_bias, has_lbias, dtype, a_dtype, device)
    s = 0.75
    sd = make_seed(seed, device) if p > 0 else None
    y, S = lk.lora_forward(x, weight, fifo, A, B, s, bias, lbias, sd, p, True)
    assert y.dtype == dtype and y.shape == (M, N) and S.dtype == torch.float32 and S.shape == (M, r)
    keep = keep_for(sd, M, K, p)
    y_ref, S_ref = ref_forward(x, weight, fifo, A, B, s, bias, lbias, keep, p)
    y_mag, S_mag = ref_forward(*absolute(x, weight), fifo, *absolute(A, B), s, *absolute(bias, lbias), keep, p)
    assert_sum_close(y, y_ref, y_mag, dtype, f"y ({fwd_path})")
    assert_sum_close(S, S_ref, S_mag, dtype, f"S ({fwd_path})")
    y2, none = lk.lora_forward(x, weight, fifo, A, B, s, bias, lbias, sd, p, False)
    assert none is None
    if device == "cpu":
        assert torch.equal(y2, y)
    else:  # compiled, save_s=False is another kernel variant (one store fewer)
        torch.testing.assert_close(y2, y, rtol=0, atol=1e-6 * y_mag.max().item())


# ----------------------------------------------------------------------------------------
# Backward.
# ----------------------------------------------------------------------------------------
def _grads_case(device, dtype, a_dtype, shape, seed):
    M, K, N, r, fifo, _, _, p = shape
    x, weight, A, B, _, _ = make_layer(M, K, N, r, fifo, False, False, dtype, a_dtype, device)
    sd = make_seed(seed, device) if p > 0 else None
    _, S = lk.lora_forward(x, weight, fifo, A, B, 0.75, None, None, sd, p, True)
    dy = rand((M, N), dtype, device)
    return (M, K, N, r, fifo, p), (x, weight, A, B, S, sd, dy)


@pytest.mark.parametrize("gemm", ["ptr", "tma", "cublas"])
@pytest.mark.parametrize("device,dtype,a_dtype,shape", KERNEL_CASES)
def test_backward(device, dtype, a_dtype, shape, gemm, monkeypatch, seed) -> None:
    """dx, dA, dB, colsum against float64, with the S the forward saved and the mask regenerated
    from the seed (so the backward's mask must be the forward's); with _TMA, the dx GEMM reads dy and W
    by TMA where their layouts allow; "cublas": dx is cuBLAS's dy W plus the low-rank term's pass, at any M
    and dtype (by default bf16 at M >= _CUBLAS_MIN_M)."""
    monkeypatch.setattr(lk, "_TMA", gemm == "tma")
    monkeypatch.setattr(lk, "_CUBLAS_MIN_M", 0 if gemm == "cublas" else 1 << 30)
    monkeypatch.setattr(lk, "_CUBLAS_DTYPES", lk._FLOATS)
    (M, K, N, r, fifo, p), (x, weight, A, B, S, sd, dy) = _grads_case(device, dtype, a_dtype, shape, seed)
    s = 0.75
    dx, dA, dB, cs = lk.lora_backward(dy, x, weight, fifo, A, B, s, S, sd, p, True, True, True, True)
    assert dx.dtype == dtype and dx.shape == (M, K)
    assert dA.dtype == dB.dtype == cs.dtype == torch.float32
    assert dA.shape == (r, K) and dB.shape == (N, r) and cs.shape == (N,)
    keep = keep_for(sd, M, K, p)
    want = ref_backward(dy, x, weight, fifo, A, B, s, keep, p)
    mags = ref_backward(*absolute(dy, x, weight), fifo, *absolute(A, B), s, keep, p)
    for name, got, w, m in zip(("dx", "dA", "dB", "colsum"), (dx, dA, dB, cs), want, mags, strict=True):
        assert_sum_close(got, w, m, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fifo", [False, True])
def test_backward_reads_by_tma_where_the_layouts_allow(device, fifo, monkeypatch, seed) -> None:
    """With _TMA set, the dx GEMM of 16-byte aligned dy and W rows reads them by TMA (with and without
    dropout, odd M, partial boxes) and gives the pointer loads' dx; 38-byte rows (N = 19, fp16) do not."""
    calls = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kw: (calls.append(kw["TMA"]), real[grid](*args, **kw))

    real = lk._bwd_dx_kernel
    monkeypatch.setattr(lk, "_bwd_dx_kernel", Spy())
    for N, p, tma in ((24, 0.0, True), (24, 0.3, True), (19, 0.0, False)):
        x, weight, A, B, _, _ = make_layer(37, 40, N, 8, fifo, False, False, torch.float16, torch.float32, device)
        sd = make_seed(seed, device) if p > 0 else None
        _, S = lk.lora_forward(x, weight, fifo, A, B, 0.75, None, None, sd, p, True)
        dy = rand((37, N), torch.float16, device)
        got = {}
        for flag in (False, True):
            monkeypatch.setattr(lk, "_TMA", flag)
            calls.clear()
            got[flag] = lk.lora_backward(dy, x, weight, fifo, A, B, 0.75, S, sd, p, True, True, False, False)[:2]
            assert calls == [flag and tma], (N, p, calls)
        assert torch.equal(got[True][1], got[False][1])  # dA: no GEMM
        keep = keep_for(sd, 37, 40, p)
        want = ref_backward(dy, x, weight, fifo, A, B, 0.75, keep, p)[0]
        mag = ref_backward(*absolute(dy, x, weight), fifo, *absolute(A, B), 0.75, keep, p)[0]
        assert_sum_close(got[True][0], want, mag, torch.float16, f"dx (N {N}, p {p}, TMA {tma})")
        torch.testing.assert_close(got[True][0], got[False][0], rtol=0, atol=1e-3 * mag.max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_backward_outputs_on_request_and_deterministic(device, seed) -> None:
    """Each need_* flag alone gives that output (the all-flags value: bit for bit under the
    interpreter; compiled, another flag set is another kernel whose dots may be laid out
    differently) and None for the others; two runs are bitwise identical (fixed-order partial
    sums, no atomics)."""
    _, (x, weight, A, B, S, sd, dy) = _grads_case(device, torch.float32, torch.float32, SHAPES[2], seed)
    args = (dy, x, weight, False, A, B, 0.75, S, sd, 0.3)
    full = lk.lora_backward(*args, True, True, True, True)
    again = lk.lora_backward(*args, True, True, True, True)
    for a, b in zip(full, again, strict=True):
        assert torch.equal(a, b)
    for i in range(4):
        flags = [j == i for j in range(4)]
        out = lk.lora_backward(*args, *flags)
        for j, o in enumerate(out):
            if j == i and device == "cpu":
                assert torch.equal(o, full[j]), (i, j)
            elif j == i:
                torch.testing.assert_close(o, full[j], rtol=1e-5, atol=1e-5 * full[j].abs().max().item())
            else:
                assert o is None, (i, j)
    y1, S1 = lk.lora_forward(x, weight, False, A, B, 0.75, None, None, sd, 0.3, True)
    y2, S2 = lk.lora_forward(x, weight, False, A, B, 0.75, None, None, sd, 0.3, True)
    assert torch.equal(y1, y2) and torch.equal(S1, S2)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_mask_matches_forward(device, seed) -> None:
    """With W = 0, dx is the masked low-rank term alone: exactly 0 where the forward dropped x
    (the forward's mask, recovered from S's dependence on x) and nonzero where it kept it."""
    M, K, N, r, p = 37, 40, 23, 8, 0.3
    x, _, A, B, _, _ = make_layer(M, K, N, r, False, False, False, torch.float32, torch.float32, device)
    weight = torch.zeros((N, K), device=device)
    sd = make_seed(seed, device)
    y, S = lk.lora_forward(x, weight, False, A, B, 1.0, None, None, sd, p, True)
    # The forward's mask, seen through S: zeroing x where the mask drops it leaves S unchanged.
    keep = lk.lora_dropout_mask(sd, M, K, p)
    _, S_kept = lk.lora_forward(x * keep, weight, False, A, B, 1.0, None, None, sd, p, True)
    torch.testing.assert_close(S_kept, S, rtol=1e-6, atol=1e-6)
    dy = rand((M, N), torch.float32, device)
    dx = lk.lora_backward(dy, x, weight, False, A, B, 1.0, S, sd, p, True, False, False, False)[0]
    assert (dx[~keep] == 0).all()
    assert (dx[keep] != 0).all()
    # dA sees x through the same mask: x changed only where dropped leaves dA unchanged.
    dA = lk.lora_backward(dy, x, weight, False, A, B, 1.0, S, sd, p, False, True, False, False)[1]
    x2 = torch.where(keep, x, x + 5.0)
    _, dA2, _, _ = lk.lora_backward(dy, x2, weight, False, A, B, 1.0, S, sd, p, False, True, False, False)
    assert torch.equal(dA2, dA)


# ----------------------------------------------------------------------------------------
# Multi-adapter forward (serving).
# ----------------------------------------------------------------------------------------
def ref_multi(x, weight, fifo, A_stack, B_stack, scalings, ranks, ids, bias) -> tuple[Tensor, Tensor]:
    """(y, Σ|terms|) in float64; ids outside [0, L) are base-only rows."""
    x64, W = _d(x), w_nk(weight, fifo).cpu()
    y, mag = x64 @ W.t(), x64.abs() @ W.abs().t()
    if bias is not None:
        y, mag = y + _d(bias), mag + _d(bias).abs()
    for a in range(A_stack.shape[0]):
        rk = int(ranks[a])
        Aa, Ba, sa = _d(A_stack[a, :rk]), _d(B_stack[a, :, :rk]), float(scalings[a])
        rows = (ids.cpu() == a)[:, None]
        y = y + torch.where(rows, sa * (x64 @ Aa.t()) @ Ba.t(), 0.0)
        mag = mag + torch.where(rows, abs(sa) * (x64.abs() @ Aa.abs().t()) @ Ba.abs().t(), 0.0)
    return y, mag


def make_stack(L, r_max, K, N, ranks, a_dtype, device, garbage=(3e4, -3e4)):
    """A/B stacks with garbage past each adapter's rank: large finite values by default (read,
    they would show in y), or NaN/inf (read even where the other side is masked to 0, they
    would make y NaN: each side must be masked by itself)."""
    A = rand((L, r_max, K), torch.float64, "cpu", 0.5)
    B = rand((L, N, r_max), torch.float64, "cpu", 0.5)
    for a, rk in enumerate(ranks):
        A[a, rk:] = garbage[0]
        B[a, :, rk:] = garbage[1]
    return A.to(device=device, dtype=a_dtype), B.to(device=device, dtype=a_dtype)


@pytest.mark.parametrize("device,dtype,a_dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,ranks,r_max,fifo,has_bias,ids_dtype,garbage", [
    (37, 40, 33, (1, 8, 16), 16, False, True, torch.int64, (3e4, -3e4)),
    (19, 19, 23, (16, 0, 5, 16), 16, True, False, torch.int32, (float("nan"), float("inf"))),
    (5, 40, 17, (64, 3), 64, False, True, torch.int32, (float("-inf"), float("nan"))),
])
@pytest.mark.parametrize("gemm", ["triton", "cublas"])
def test_multi_forward(device, dtype, a_dtype, M, K, N, ranks, r_max, fifo, has_bias, ids_dtype, garbage, gemm,
                       monkeypatch, seed) -> None:
    """Rows of mixed adapters (and base-only ones) against float64, with garbage past each rank; by the Triton
    GEMM, or by cuBLAS's x Wᵀ and the adapter pass ("cublas": every dtype and M here; by default bf16 at M >=
    _CUBLAS_MIN_M)."""
    monkeypatch.setattr(lk, "_CUBLAS_MIN_M", 0 if gemm == "cublas" else 1 << 30)
    monkeypatch.setattr(lk, "_CUBLAS_DTYPES", lk._FLOATS)
    real, taken = lk._multi_fwd_kernel, []

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kw: (taken.append(kw["CUBLAS"]), real[grid](*args, **kw))
    monkeypatch.setattr(lk, "_multi_fwd_kernel", Spy())
    L = len(ranks)
    x, weight, _, _, bias, _ = make_layer(M, K, N, 1, fifo, has_bias, False, dtype, a_dtype, device)
    A, B = make_stack(L, r_max, K, N, ranks, a_dtype, device, garbage)
    scalings = torch.rand(L, dtype=torch.float32, device=device) * 2 + 0.25
    ranks_t = torch.tensor(ranks, dtype=torch.int32, device=device)
    ids = torch.randint(-1, L, (M,), dtype=ids_dtype, device=device)
    ids[0] = -1  # base-only rows are always present, and every adapter's
    ids[1: 1 + L] = torch.arange(L, dtype=ids_dtype)[: max(0, min(L, M - 1))]
    y = lk.lora_multi_forward(x, weight, fifo, A, B, scalings, ranks_t, ids, bias)
    assert y.dtype == dtype and y.shape == (M, N) and taken == [gemm == "cublas"]
    want, mag = ref_multi(x, weight, fifo, A, B, scalings.cpu(), ranks, ids, bias)
    assert_sum_close(y, want, mag, dtype, "y")


@pytest.mark.parametrize("device", DEVICES)
def test_multi_forward_ids_out_of_range_stay_in_bounds(device, seed) -> None:
    """Ids outside [-1, L) (the caller's to reject) and ranks outside [0, r_max] never make the
    kernels address memory they were not given: such rows are base-only, such ranks clamped.
    Every row uses a different id so a wrong address would show as a wrong row."""
    M, K, N, L, r_max = 8, 19, 23, 2, 16
    x, weight, _, _, bias, _ = make_layer(M, K, N, 1, False, True, False, torch.float32, torch.float32, device)
    A, B = make_stack(L, r_max, K, N, (0, 16), torch.float32, device)
    ids = torch.tensor([1, 0, 2, -2, 1 << 33, -(1 << 40), (1 << 32) + 1, 1], dtype=torch.int64, device=device)
    ranks = torch.tensor([-3, (1 << 32) + 3], dtype=torch.int64, device=device)  # clamped to 0 and r_max
    scal = torch.tensor([0.5, 2.0], device=device)
    y = lk.lora_multi_forward(x, weight, False, A, B, scal, ranks, ids, bias)
    # 2^32 + 1 must not wrap around to adapter 1 (nor 2^33 to adapter 0).
    want_ids = torch.tensor([1, 0, -1, -1, -1, -1, -1, 1])
    want, mag = ref_multi(x, weight, False, A, B, scal.cpu(), (0, 16), want_ids, bias)
    assert_sum_close(y, want, mag, torch.float32, "y")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_multi_forward_a_broken_adapter_reaches_only_its_rows(backend, device, seed) -> None:
    """Serving isolation: adapter 1's weights are NaN and inf inside its rank (a corrupted upload);
    the rows of adapter 0 and the base-only rows of the same tiles are those of a batch without it."""
    M, K, N, L, r = 12, 19, 23, 2, 8
    x, weight, _, _, bias, _ = make_layer(M, K, N, 1, False, True, False, torch.float32, torch.float32, device)
    A, B = make_stack(L, r, K, N, (r, r), torch.float32, device)
    A[1, 0], B[1, :, 1] = math.nan, math.inf
    ids = torch.tensor([0, 1, -1, 1, 0, 0, -1, 1, 0, 1, 0, -1], device=device)
    scal = torch.tensor([0.5, 2.0], device=device)
    ranks = torch.tensor([r, r], dtype=torch.int32, device=device)
    with torch.no_grad():
        y = kfuse.lora_linear_multi(x, weight, A, B, scal, ranks, ids, bias=bias, backend=backend)
    good = ids != 1
    assert y[good].isfinite().all() and not y[~good].isfinite().any()
    want, mag = ref_multi(x[good], weight, False, A[:1], B[:1], scal[:1].cpu(), (r,), ids[good], bias)
    assert_sum_close(y[good], want, mag, torch.float32, "rows of the other adapter and of the base")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nonfinite_products_with_extreme_scalings(backend, device, seed) -> None:
    """y = x Wᵀ + s·((x Aᵀ) Bᵀ) as written, for s = 0 and s = inf too: a NaN adapter at s = 0 gives
    NaN (0·NaN, as PEFT's ``lora_B(lora_A(x)) * scaling``; BLAS would skip the product at
    alpha = 0), and s = inf gives ±inf, not the NaN of 0·inf from the padded rank lanes."""
    M, K, N, r = 9, 19, 23, 3
    x, weight, A, B, bias, _ = make_layer(M, K, N, r, False, True, False, torch.float32, torch.float32, device)
    B[2, 1] = math.nan
    with torch.no_grad():
        y = kfuse.lora_linear(x, weight, A, B, 0.0, bias=bias, backend=backend)
    assert y[:, 2].isnan().all() and y[:, 3:].isfinite().all(), "a NaN in B's row 2 at scaling 0"
    B[2, 1] = 0.5
    L, r_max = 2, 16
    A_st, B_st = make_stack(L, r_max, K, N, (r, 5), torch.float32, device, garbage=(0.0, 0.0))
    scal = torch.tensor([math.inf, 0.0], device=device)
    ranks = torch.tensor([r, 5], dtype=torch.int32, device=device)
    ids = torch.tensor([0, 1, -1, 0, 1, 0, -1, 1, 0], device=device)
    with torch.no_grad():
        y = kfuse.lora_linear_multi(x, weight, A_st, B_st, scal, ranks, ids, bias=bias, backend=backend)
    want = lora_linear_multi_reference(x.double(), weight.double(), A_st.double(), B_st.double(), scal.double(),
                                       ranks, ids, bias.double())
    inf_rows = ids == 0
    assert y[inf_rows].isinf().all() and (y[inf_rows].sign() == want[inf_rows].sign()).all()
    torch.testing.assert_close(y[~inf_rows].double(), want[~inf_rows], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_several_rank_blocks(device, monkeypatch, seed) -> None:
    """Ranks above the rank block loop over blocks (grid axis or in-kernel loop, per kernel):
    forced here with 16-wide blocks and r = 40 (blocks of 16, 16, 8) through every launcher."""
    monkeypatch.setattr(lk, "_RB_MAX", 16)
    M, K, N, r, p, s = 37, 19, 23, 40, 0.3, 0.5
    dtype = torch.float32
    x, weight, A, B, bias, lbias = make_layer(M, K, N, r, True, True, True, dtype, dtype, device)
    sd = make_seed(seed, device)
    keep = lk.lora_dropout_mask(sd, M, K, p)
    y_ref, S_ref = ref_forward(x, weight, True, A, B, s, bias, lbias, keep, p)
    y_mag, S_mag = ref_forward(*absolute(x, weight), True, *absolute(A, B), s, *absolute(bias, lbias), keep, p)
    for small_m in (1 << 30, -1):
        monkeypatch.setattr(lk, "_SMALL_M", small_m)
        y, S = lk.lora_forward(x, weight, True, A, B, s, bias, lbias, sd, p, True)
        assert_sum_close(y, y_ref, y_mag, dtype, f"y (_SMALL_M={small_m})")
        assert_sum_close(S, S_ref, S_mag, dtype, f"S (_SMALL_M={small_m})")
    dy = rand((M, N), dtype, device)
    got = lk.lora_backward(dy, x, weight, True, A, B, s, S, sd, p, True, True, True, True)
    want = ref_backward(dy, x, weight, True, A, B, s, keep, p)
    mags = ref_backward(*absolute(dy, x, weight), True, *absolute(A, B), s, keep, p)
    for name, g, w, m in zip(("dx", "dA", "dB", "colsum"), got, want, mags, strict=True):
        assert_sum_close(g, w, m, dtype, name)
    ranks = (40, 7, 17)
    A3, B3 = make_stack(3, r, K, N, ranks, dtype, device)
    ids = torch.tensor([i % 4 - 1 for i in range(M)], device=device)
    scal = torch.tensor([0.5, 1.5, 3.0], device=device)
    y = lk.lora_multi_forward(x, weight, True, A3, B3, scal, torch.tensor(ranks, device=device), ids, bias)
    want_y, mag_y = ref_multi(x, weight, True, A3, B3, scal.cpu(), ranks, ids, bias)
    assert_sum_close(y, want_y, mag_y, dtype, "multi y")


@pytest.mark.interpret
@pytest.mark.parametrize("M", [1, 37, 130, 300, 2050])
def test_gpu_block_configs_under_interpreter(M, monkeypatch, seed) -> None:
    """The launchers with the block sizes, splits and partial layouts they pick on a GPU (the
    interpreter tests otherwise use small tiles): grids, split-K, dy splits and rank blocks for
    those sizes, checked on CPU. fp16 with fp32 adapters, dropout on. M = 300 runs the 128×128×64
    tile, M = 2050 the 128×256×64 one (dx 128 wide: dropout), each with a partial last row tile."""
    monkeypatch.setattr(lk, "INTERPRETED", False)
    K, N, r, p, s = 200, 264, 16, 0.3, 0.5
    dtype = torch.float16
    x, weight, A, B, bias, lbias = make_layer(M, K, N, r, False, True, True, dtype, torch.float32, "cpu")
    sd = make_seed(seed, "cpu")
    keep = lk.lora_dropout_mask(sd, M, K, p)
    y, S = lk.lora_forward(x, weight, False, A, B, s, bias, lbias, sd, p, True)
    y_ref, S_ref = ref_forward(x, weight, False, A, B, s, bias, lbias, keep, p)
    y_mag, S_mag = ref_forward(*absolute(x, weight), False, *absolute(A, B), s, *absolute(bias, lbias), keep, p)
    assert_sum_close(y, y_ref, y_mag, dtype, "y")
    assert_sum_close(S, S_ref, S_mag, dtype, "S")
    dy = rand((M, N), dtype, "cpu")
    got = lk.lora_backward(dy, x, weight, False, A, B, s, S, sd, p, True, True, True, True)
    want = ref_backward(dy, x, weight, False, A, B, s, keep, p)
    mags = ref_backward(*absolute(dy, x, weight), False, *absolute(A, B), s, keep, p)
    for name, g, w, m in zip(("dx", "dA", "dB", "colsum"), got, want, mags, strict=True):
        assert_sum_close(g, w, m, dtype, name)
    ranks = (16, 5, 9)
    A3, B3 = make_stack(3, r, K, N, ranks, torch.float32, "cpu")
    ids = torch.tensor([i % 4 - 1 for i in range(M)])
    scal = torch.tensor([0.5, 1.5, 3.0])
    y = lk.lora_multi_forward(x, weight, False, A3, B3, scal, torch.tensor(ranks), ids, bias)
    want_y, mag_y = ref_multi(x, weight, False, A3, B3, scal, ranks, ids, bias)
    assert_sum_close(y, want_y, mag_y, dtype, "multi y")


# ----------------------------------------------------------------------------------------
# Edge sizes and bad input.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_degenerate_sizes(device, monkeypatch) -> None:
    f32 = dict(dtype=torch.float32, device=device)
    W, A, B = torch.randn(5, 7, **f32), torch.randn(3, 7, **f32), torch.randn(5, 3, **f32)
    bias, lbias = torch.randn(5, **f32), torch.randn(5, **f32)
    y, S = lk.lora_forward(torch.empty(0, 7, **f32), W, False, A, B, 2.0, bias, None, None, 0.0, True)
    assert y.shape == (0, 5) and S.shape == (0, 3)
    # K = 0: y = bias + s·lora_bias, S = 0.
    y, S = lk.lora_forward(torch.empty(4, 0, **f32), torch.empty(5, 0, **f32), False, torch.empty(3, 0, **f32), B,
                           2.0, bias, lbias, None, 0.0, True)
    torch.testing.assert_close(y, (bias + 2.0 * lbias).expand(4, 5))
    assert (S == 0).all()
    x, dy = torch.randn(4, 7, **f32), torch.randn(0, 5, **f32)
    dx, dA, dB, cs = lk.lora_backward(dy, x[:0], W, False, A, B, 2.0, torch.empty(0, 3, **f32), None, 0.0,
                                      True, True, True, True)
    assert dx.shape == (0, 7) and (dA == 0).all() and (dB == 0).all() and (cs == 0).all()
    ids = torch.empty(0, dtype=torch.int64, device=device)
    y = lk.lora_multi_forward(x[:0], W, False, A[None], B[None], torch.ones(1, **f32),
                              torch.tensor([3], device=device), ids, None)
    assert y.shape == (0, 5)
    assert lk.lora_dropout_mask(make_seed(1, device), 0, 7, 0.5).shape == (0, 7)
    # r = 0: the base layer alone, on both forward paths; dA, dB empty; dx = dy W.
    A0, B0 = torch.empty(0, 7, **f32), torch.empty(5, 0, **f32)
    want = x @ W.t() + bias
    for small_m in (0, 1 << 30):
        monkeypatch.setattr(lk, "_SMALL_M", small_m)
        y, S = lk.lora_forward(x, W, False, A0, B0, 2.0, bias, None, make_seed(3, device), 0.5, True)
        torch.testing.assert_close(y, want)
        assert S.shape == (4, 0)
    dy = torch.randn(4, 5, **f32)
    dx, dA, dB, cs = lk.lora_backward(dy, x, W, False, A0, B0, 2.0, S, None, 0.0, True, True, True, True)
    torch.testing.assert_close(dx, dy @ W)
    assert dA.shape == (0, 7) and dB.shape == (5, 0)
    torch.testing.assert_close(cs, dy.sum(0))


def test_bad_input_raises() -> None:
    x, W, A, B = torch.randn(4, 7), torch.randn(5, 7), torch.randn(3, 7), torch.randn(5, 3)
    sd = torch.tensor([1], dtype=torch.int64)
    with pytest.raises(ValueError, match="p must be in"):
        lk.lora_forward(x, W, False, A, B, 1.0, None, None, sd, 1.0, False)
    with pytest.raises(ValueError, match="weight must be"):
        lk.lora_forward(x, W, True, A, B, 1.0, None, None, None, 0.0, False)
    with pytest.raises(ValueError, match="B must have shape"):
        lk.lora_forward(x, W, False, A, B.t(), 1.0, None, None, None, 0.0, False)
    with pytest.raises(ValueError, match="float32 or x's dtype"):
        lk.lora_forward(x, W, False, A.double(), B, 1.0, None, None, None, 0.0, False)
    with pytest.raises(ValueError, match="x must be"):
        lk.lora_forward(x.double(), W.double(), False, A, B, 1.0, None, None, None, 0.0, False)
    with pytest.raises(ValueError, match="contiguous"):
        lk.lora_forward(x.t().contiguous().t(), W, False, A, B, 1.0, None, None, None, 0.0, False)
    with pytest.raises(ValueError, match="seed must be"):
        lk.lora_forward(x, W, False, A, B, 1.0, None, None, sd.int(), 0.5, False)
    with pytest.raises(ValueError, match="bias must be"):
        lk.lora_forward(x, W, False, A, B, 1.0, torch.randn(4), None, None, 0.0, False)
    with pytest.raises(ValueError, match="dy must be"):
        lk.lora_backward(torch.randn(4, 6), x, W, False, A, B, 1.0, torch.randn(4, 3), None, 0.0,
                         True, True, True, True)
    with pytest.raises(ValueError, match="adapter_ids must be"):
        lk.lora_multi_forward(x, W, False, A[None], B[None], torch.ones(1), torch.tensor([3]),
                              torch.zeros(4), None)


# ----------------------------------------------------------------------------------------
# Compiled for the GPU, without one.
# ----------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the kernels are compiled and run by the '-cuda' tests")
def test_triton_kernels_compile_for_sm90() -> None:
    """Every kernel, as the launchers launch it on a GPU (their tiles, Triton's specialisation of
    each argument), compiles to sm_90a machine code and fits an H200 (``tests/sm90.py``): forward
    (shrink + GEMM and the decode path's split-K), backward (every output, and dx alone), the
    multi-adapter forward and the dropout mask; fp16 (fp16 and fp32 adapters), bf16 (fp32 adapters,
    dropout, biases, both weight layouts; at M = 4096 cuBLAS + the update pass) and fp32 (dropout);
    M = K = N = 4096, odd sizes and
    sizes of 1 (which a launch's specialisation turns into constants). The
    interpreter never runs the compiler (its type rules, layouts, tf32 dots, shared-memory budget).
    ~2 min of compiling on 2 cores when Triton's cache is cold."""
    launches = sm90.run_script("""
import torch
from kfuse.triton_kernels import lora as lk
e = lambda *shape, dt=torch.float32: torch.empty(*shape, dtype=dt, device="meta")
seed = e(1, dt=torch.int64)
for dt, ad, p, biases in ((torch.float16, torch.float16, 0.0, False), (torch.float16, torch.float32, 0.0, False),
                          (torch.bfloat16, torch.float32, 0.1, True), (torch.float32, torch.float32, 0.1, False)):
    for M, K, N, r, fifo in ((4096, 4096, 4096, 16, False), (16, 4096, 4096, 16, False),
                             (33, 100, 70, 7, dt == torch.bfloat16), (1, 1, 1, 1, False)):
        x, A, B = e(M, K, dt=dt), e(r, K, dt=ad), e(N, r, dt=ad)
        W = e(K, N, dt=dt) if fifo else e(N, K, dt=dt)
        bias, lbias = (e(N, dt=dt), e(N, dt=ad)) if biases else (None, None)
        y, S = lk.lora_forward(x, W, fifo, A, B, 2.0, bias, lbias, seed, p, True)
        if M != 16:  # the backward has no decode path
            lk.lora_backward(y, x, W, fifo, A, B, 2.0, S, seed, p, True, True, True, biases)
            lk.lora_backward(y, x, W, fifo, A, B, 2.0, S, seed, p, True, False, False, False)
    for M, ids_dt in ((4096, torch.int64), (16, torch.int32)):
        lk.lora_multi_forward(e(M, 4096, dt=dt), e(4096, 4096, dt=dt), False, e(4, 16, 4096, dt=ad),
                              e(4, 4096, 16, dt=ad), e(4), e(4, dt=torch.int64), e(M, dt=ids_dt), None)
lk.lora_dropout_mask(seed, 4096, 4096, 0.1)
lk._TMA = True  # the forward and dx GEMMs with TMA reads (off by default until timed)
lk._CUBLAS_MIN_M = 1 << 30  # (bf16 at M = 4096 takes cuBLAS + the update pass above; here the TMA GEMM)
for dt, ad, p in ((torch.bfloat16, torch.float32, 0.1), (torch.float16, torch.float16, 0.0)):
    for fifo in (False, True):
        x, W, A, B = e(4096, 4096, dt=dt), e(4096, 4096, dt=dt), e(16, 4096, dt=ad), e(4096, 16, dt=ad)
        y, S = lk.lora_forward(x, W, fifo, A, B, 2.0, None, None, seed, p, True)
        lk.lora_backward(y, x, W, fifo, A, B, 2.0, S, seed, p, True, True, True, False)
""")
    assert {launch["kernel"] for launch in launches} == sm90.launched_kernels(lk)


# ---------------------------------------------------------------- the report's and benchmarks' LoRA rows
# LoRA in the benchmark report (``kfuse.bench.lora``, ``python -m kfuse --ops lora``): the byte and
# FLOP formulas on a hand-computed case, the ratio basis and targets, and the report rows run end
# to end at tiny shapes on the CPU (seconds).

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a Case only names its device: no GPU needed


def test_registered() -> None:
    assert OPS["lora"] is lora_bench


def test_formulas_hand_computed() -> None:
    """M = 2, K = 3, N = 5, r = 1; x, W, y bf16 (2 bytes), A, B fp32 (4), S fp32 (4)."""
    fwd = lora_bench.gemm_case(CUDA, torch.bfloat16, "fwd", 2, 3, 5, r=1)
    bwd = lora_bench.gemm_case(CUDA, torch.bfloat16, "bwd", 2, 3, 5, r=1)
    multi = lora_bench.gemm_case(CUDA, torch.bfloat16, "multi", 2, 3, 5, r=1, adapters=3)
    # forward: x 6 + W 15 + y 10 elements of 2 bytes; A 3 + B 5 of 4 bytes
    assert lora_bench.bytes_moved(fwd) == 2 * (6 + 15 + 10) + 4 * (3 + 5) == 94
    # 2·M·N·K + 2·M·r·(K + N)
    assert lora_bench.flops(fwd) == 2 * 2 * 5 * 3 + 2 * 2 * 1 * 8 == 92
    # backward: dY 10 + x 6 + dx 6 + W 15 (2 bytes); S 2 (4); A, B read and dA, dB written: 16 (4)
    assert lora_bench.bytes_moved(bwd) == 2 * (10 + 6 + 6 + 15) + 4 * 2 + 4 * 16 == 146
    # dx = dY W: 60; G = dY B: 20; dx += G A: 12; dA = Gᵀ x: 12; dB = dYᵀ S: 20
    assert lora_bench.flops(bwd) == 60 + 20 + 12 + 12 + 20 == 124
    # multi: the forward's x, W, y; three adapters of 8 fp32 elements; two int64 ids
    assert lora_bench.bytes_moved(multi) == 2 * 31 + 3 * 4 * 8 + 8 * 2 == 174
    assert lora_bench.flops(multi) == 92
    step = lora_bench.step_case(CPU, torch.float32, 2, 8, 1, 64, 64)
    assert lora_bench.bytes_moved(step) is None and lora_bench.flops(step) is None
    # the cases' shapes: r = 16 over K = N = 4096 adds 0.8 % to the base GEMM's FLOPs
    big = lora_bench.gemm_case(CUDA, torch.bfloat16, "fwd", 4096, 4096, 4096)
    assert lora_bench.flops(big) / (2 * 4096**3) == pytest.approx(1 + 2 * 16 * 8192 / (2 * 4096 * 4096))


def test_targets_and_basis() -> None:
    def case(mode: str, M: int, device: torch.device = CUDA) -> lora_bench.Case:
        adapters = 8 if mode == "multi" else None
        return lora_bench.gemm_case(device, torch.bfloat16, mode, M, 4096, 4096, adapters=adapters)

    assert [lora_bench.target(case("fwd", m)) for m in (1, 128, 2048, 4096, 16384)] == [1.10, 1.10, None, 1.05, 1.05]
    assert lora_bench.target(case("bwd", 1)) == 1.15 and lora_bench.target(case("multi", 128)) == 1.3
    assert lora_bench.target(case("fwd", 4096, CPU)) is None
    ceil = Ceilings(copy_bytes=1, copy_gbps=1000.0, matmul="", matmul_tflops=1.0)
    assert lora_bench.ratio_basis(case("fwd", 128), {"base": 2.0, "peft": 5.0}, ceil) == (2.0, "x@W.T")
    assert lora_bench.ratio_basis(case("bwd", 128), {"base": 3.0}, ceil) == (3.0, "dY@W")
    assert lora_bench.ratio_basis(case("fwd", 128), {"peft": 5.0}, ceil) is None
    # multi: + 8 adapters · 16 · (4096 + 4096) fp32 = 4 MiB at 1000 GB/s
    ms, label = lora_bench.ratio_basis(case("multi", 128), {"base": 2.0}, ceil)
    assert label == "x@W.T+read" and ms == pytest.approx(2.0 + 8 * 16 * 8192 * 4 / 1000e9 * 1e3)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_gemm_row_is_the_gemm_alone(device: str, monkeypatch) -> None:
    """The report's ``triton-gemm`` diagnostic (the Triton forward at rank 0) computes x Wᵀ, at the
    decode path's M and the GEMM path's; where Triton cannot run it is skipped with the reason. It times
    the Triton GEMM even where the forward takes cuBLAS's x Wᵀ (bf16 at large M; here every dtype and M: it
    timed cuBLAS's, review)."""
    monkeypatch.setattr(lk, "_CUBLAS_MIN_M", 0)
    monkeypatch.setattr(lk, "_CUBLAS_DTYPES", lk._FLOATS)
    update = lk._fwd_update_kernel
    monkeypatch.setattr(lk, "_fwd_update_kernel", None)  # (launching it would fail)
    for M in (3, 70):
        x, w = torch.randn(M, 40, device=device), torch.randn(24, 40, device=device)
        case = lora_bench.gemm_case(torch.device(device), torch.float32, "fwd", M, 40, 24)
        cand = lora_bench._triton_gemm(case, x, w, None,
                                       lora_bench._own_check(lambda x=x, w=w: x.double() @ w.double().t()))
        assert_close(cand.run(), x @ w.t(), torch.float32, f"M={M}")
        assert cand.error(cand.run()) < 1e-5
        assert cand.work == (2 * M * 24 * 40, 4 * (M * 40 + 24 * 40 + M * 24))  # the GEMM's own (bench-math audit)
    assert lk._CUBLAS_MIN_M == 0 and lk._fwd_update_kernel is None  # restored after each run
    monkeypatch.setattr(lk, "_fwd_update_kernel", update)
    assert lora_bench._triton_gemm(case, x, w, "no triton", cand.error).skip == "no triton"


def _tiny_cases(device: torch.device, quick: bool) -> list[lora_bench.Case]:
    dt, K, N, r = torch.float32, 40, 24, 4
    gemm = lora_bench.gemm_case
    return [gemm(device, dt, "fwd", 1, K, N, r), gemm(device, dt, "fwd", 9, K, N, r),
            gemm(device, torch.float16, "fwd", 5, K, N, r), gemm(device, dt, "bwd", 7, K, N, r),
            gemm(device, dt, "multi", 9, K, N, r, adapters=3),
            lora_bench.step_case(device, dt, 2, 8, 1, 64, 64, r=r)]


def test_report_rows_tiny(report_rows) -> None:
    """``python -m kfuse --ops lora`` at tiny shapes: every case has its rows, every row that ran
    has a finite time and ratio and passed its check, the base GEMM is the basis (ratio 1), the
    backward rows report the bytes saved (kfuse: exactly x and S), and the table shows them."""
    rows, ran, out = report_rows("lora", lora_bench, _tiny_cases)
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "multi", "step"}
    for r in ran:
        assert r["target"] is None  # targets are the GPU's
    gemm = [r for r in ran if r["mode"] != "step"]
    assert all(r["tflops"] > 0 and r["pct_matmul"] > 0 for r in gemm)
    by = {(r["shape"], r["mode"], r["name"]): r for r in rows}
    for shape, mode in {(r["shape"], r["mode"]) for r in gemm}:
        assert by[shape, mode, "cpu"]["status"] == "ok" and by[shape, mode, "base"]["status"] == "ok"
        if mode != "multi":
            assert by[shape, mode, "base"]["ratio"] == 1.0
    assert by["1x40x24 r=4", "fwd", "triton"]["status"] == "skipped"
    # kfuse with adapters in x's half dtype beside its fp32-adapter row; for fp32 x the same row, skipped
    half = {r["name"]: r for r in rows if r["shape"] == "5x40x24 r=4"}
    assert half["cpu"]["status"] == half["cpu-fp16"]["status"] == "ok" and half["cpu-fp16"]["passed"]
    assert half["triton-fp16"]["status"] == "skipped"
    assert by["9x40x24 r=4", "fwd", "cpu-fp32"]["status"] == "skipped"
    # the backward: kfuse saves x [7, 40] and S [7, 4] (fp32), nothing else beside W, A, B
    assert by["7x40x24 r=4", "bwd", "cpu"]["extra"]["saved MiB"] * 2**20 == 4 * 7 * 40 + 4 * 7 * 4
    has_peft = importlib.util.find_spec("peft") is not None and importlib.util.find_spec("transformers") is not None
    for name in ("peft", "addmm", "compile"):
        r = by["7x40x24 r=4", "bwd", name]
        if name == "peft" and not has_peft:
            assert r["status"] == "skipped" and "peft" in r["note"]
            continue
        assert r["extra"]["saved MiB"] * 2**20 >= 4 * 7 * 40, r
    step = [r for r in rows if r["mode"] == "step"]
    assert [r["name"] for r in step] == ["fused", "peft"]
    if has_peft:
        assert step[1]["status"] == "ok" and step[1]["extra"]["tok/s"] > 0 and step[1]["ratio"] == 1.0
    else:
        assert all(r["status"] == "skipped" for r in step)
    assert "x@W.T" in out and "dY@W" in out and "saved MiB" in out and ("tok/s" in out) == has_peft


def test_module_casts_keep_accumulation_dtype_scalings_and_adapter_dtype_is_checked() -> None:
    """MultiLoRALinear.to(half) keeps ``scalings`` float32 (documented; they were rounded to the
    module's dtype, 0.2% of the LoRA term in bf16), also for adapters added after the cast; an
    adapter_dtype the op cannot take (neither float32 nor the base's) is refused at construction,
    naming it, where it failed at the first forward."""
    m = kfuse.nn.MultiLoRALinear(8, 4)
    m.add_adapter(torch.randn(3, 8), torch.randn(4, 3), 2 / 3)
    for dt in (torch.float16, torch.bfloat16):
        half = copy.deepcopy(m).to(dt)
        half.add_adapter(torch.randn(3, 8), torch.randn(4, 3), 1 / 3)
        assert half.scalings.dtype == torch.float32
        assert half.scalings.tolist() == torch.tensor([2 / 3, 1 / 3]).tolist()
        assert half.A_stack.dtype == dt and half.weight.dtype == dt
    # A float64 layer keeps float64 scalings (float32 ones put ~1e-7 of error into its LoRA term; review
    # 2026-12-04), made so or cast so; and back to float32 with the layer.
    x, ids = torch.randn(5, 8, dtype=torch.float64), torch.tensor([0, 1, -1, 1, 0])
    A, B = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    for f64 in (kfuse.nn.MultiLoRALinear(8, 4, dtype=torch.float64), copy.deepcopy(m).double()):
        f64.A_stack, f64.B_stack, f64.scalings, f64.ranks = (f64.A_stack[:0], f64.B_stack[:0], f64.scalings[:0],
                                                            f64.ranks[:0])
        for a, b in zip(A, B, strict=True):
            f64.add_adapter(a, b, 1 / 3)
        assert f64.scalings.dtype == torch.float64
        with torch.no_grad():
            want = x @ f64.weight.T + f64.bias + torch.stack(
                [(1 / 3) * (x[i] @ A[j].T) @ B[j].T if j >= 0 else torch.zeros(4, dtype=torch.float64)
                 for i, j in enumerate(ids.tolist())])
            torch.testing.assert_close(f64(x, ids), want, rtol=0, atol=1e-13)
        assert f64.float().scalings.dtype == torch.float32
    for cls in (kfuse.nn.LoRALinear, kfuse.nn.MultiLoRALinear):
        with pytest.raises(TypeError, match="adapter_dtype must be torch.float32 or the base weight's dtype"):
            cls(8, 4, adapter_dtype=torch.float16)
        with pytest.raises(TypeError, match="adapter_dtype"):
            cls(8, 4, dtype=torch.bfloat16, adapter_dtype=torch.float64)
        assert cls(8, 4, dtype=torch.bfloat16, adapter_dtype=torch.bfloat16) is not None


# ---------------------------------------------------------------- the eager-path gate (ops._gate, _C.lora_gate)
needs_extension = pytest.mark.skipif(_backends.extension() is None, reason="kfuse._C is not built")


def _gate_case(rng: np.random.Generator) -> dict:
    """lora_linear's arguments, each valid most of the time and otherwise wrong in one of the ways the gate must
    decline (a dtype, a shape, a device, a layout, a subclass, a lazy negation, a non-float scalar)."""
    def pick(*options):
        return options[int(rng.integers(len(options)))]

    bad = rng.random() < 0.6
    dt = pick(torch.float32, torch.float64, torch.float16, torch.bfloat16) if not (bad and rng.random() < 0.1) \
        else torch.int32
    K, N, r = (int(v) for v in rng.integers(1, 7, 3))
    fifo = bool(rng.random() < 0.3)
    adt = pick(torch.float32, dt)
    lead = [int(v) for v in rng.integers(0, 4, int(rng.integers(0, 3)))]
    x = torch.randn(*lead, K).to(dt) if dt != torch.int32 else torch.zeros(*lead, K, dtype=dt)
    args = dict(x=x, weight=torch.randn(K, N).to(dt) if fifo else torch.randn(N, K).to(dt),
                lora_A=torch.randn(r, K).to(adt), lora_B=torch.randn(N, r).to(adt),
                bias=pick(None, torch.randn(N).to(dt)), lora_bias=pick(None, torch.randn(N).to(adt)),
                scaling=pick(0.5, 2.0, -1.0), dropout_p=pick(0.0, 0.25), training=pick(True, False),
                fan_in_fan_out=fifo)
    if dt == torch.int32:
        args["weight"] = args["weight"].to(torch.int32)
    if bad:
        name = pick("x", "weight", "lora_A", "lora_B", "bias", "lora_bias", "scaling", "dropout_p", "training",
                    "fan_in_fan_out")
        v = args[name]
        if isinstance(v, Tensor):
            how = pick("dtype", "shape", "meta", "neg", "sub", "strided", "param", "grad", "empty")
            if how == "dtype":
                v = v.to(torch.float64 if v.dtype != torch.float64 else torch.float32)
            elif how == "shape":
                v = torch.randn(*v.shape[:-1], v.shape[-1] + 1).to(v.dtype) if v.ndim else v
            elif how == "meta":
                v = v.to("meta")
            elif how == "neg":
                v = torch._neg_view(v)
            elif how == "sub":
                v = v.as_subclass(type("Sub", (Tensor,), {}))
            elif how == "strided" and v.ndim:
                v = torch.cat([v, v], -1)[..., ::2]  # valid: any strides
            elif how == "param":
                v = nn.Parameter(v, requires_grad=v.dtype.is_floating_point)  # valid
            elif how == "grad" and v.dtype.is_floating_point:
                v = v.requires_grad_()  # valid
            elif how == "empty" and v.ndim:
                v = v[..., :0]
            args[name] = v
        elif name in ("scaling", "dropout_p"):
            args[name] = pick(1, float("nan"), 1.5, np.float64(0.5), torch.tensor(0.5))
        elif name == "training":
            args[name] = pick(1, None, np.bool_(True))
        elif name == "fan_in_fan_out":
            args[name] = pick(0, None, "no")
        elif args[name] is None:
            args[name] = torch.randn(N + 1)
    return args


def _full_path_says(args: dict) -> tuple[str, bool] | None:
    """What lora_linear's full path decides for ``args``: (route, needs_grad), or None when it raises."""
    try:
        ops._checks.check_bool("kfuse.lora_linear", "training", args["training"])
        ops._validate(args["x"], args["weight"], args["lora_A"], args["lora_B"], args["scaling"], args["bias"],
                      args["lora_bias"], args["dropout_p"], args["fan_in_fan_out"])
    except (TypeError, ValueError):
        return None
    tensors = tuple(args[k] for k in ("x", "weight", "lora_A", "lora_B", "bias", "lora_bias"))
    if torch.overrides.has_torch_function(tensors):
        return "torch_function", False
    return ops._routing.route(ops._select("lora_linear", "auto", args["x"]), tensors), ops._routing.needs_grad(tensors)


@needs_extension
def test_gate_passes_only_calls_the_full_path_validates_and_routes_eagerly(seed: int) -> None:
    """lora_linear hands a call to its eager path without _validate and _routing.route when _gate says so (their
    Python took ~25-30 us of a small call after a GEMM). Over 3000 random calls, valid or wrong in one argument,
    under grad mode on and off: a gate of 1 or 2 only where the full path validates the call and routes it eagerly
    (2 exactly where it needs autograd), and 0 for none of the plain, valid, float-scalar calls it is for."""
    rng = np.random.default_rng(seed)
    taken = declined = 0
    for i in range(3000):
        args = _gate_case(rng)
        with torch.set_grad_enabled(i % 3 != 0):
            gate = ops._gate(args["x"], args["weight"], args["lora_A"], args["lora_B"], args["scaling"], args["bias"],
                             args["lora_bias"], args["dropout_p"], args["training"], args["fan_in_fan_out"])
            said = _full_path_says(args)
        plain_scalars = type(args["scaling"]) is float and type(args["dropout_p"]) is float
        if gate:
            taken += 1
            assert said == (ops._routing.EAGER, gate == 2), (args, gate, said)
        elif (said is not None and said[0] == ops._routing.EAGER and plain_scalars
              and not any(isinstance(v, Tensor) and v.is_neg() for v in args.values())):
            declined += 1  # (lazy negations go the full way: the gate takes no Negative dispatch key)
    assert taken > 500 and declined == 0, (taken, declined)


@needs_extension
def test_gate_declines_traces_modes_and_transforms(seed: int) -> None:
    """Calls the full path routes elsewhere (registered op, reference) or transforms: a dispatch mode, autocast, a
    torch-function mode, forward-mode AD, torch.func.grad and vmap wrappers; the gate says 0 for each."""
    torch.manual_seed(seed)
    x, w, A, B = torch.randn(3, 5), torch.randn(4, 5), torch.randn(2, 5), torch.randn(4, 2)

    def gate(*ts: Tensor) -> int:
        return ops._gate(*ts, 0.5, None, None, 0.0, True, False)

    assert gate(x, w, A, B) == 1
    assert gate(x, w, A.requires_grad_(), B) == 2
    with torch.no_grad():
        assert gate(x, w, A, B) == 1
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert gate(x, w, A, B) == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gate(x, w, A, B) == 0

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert gate(x, w, A, B) == 0
    import torch.autograd.forward_ad as fwad  # noqa: PLC0415
    with fwad.dual_level():
        assert gate(fwad.make_dual(x, torch.ones_like(x)), w, A, B) == 0
    seen = []
    torch.func.grad(lambda a: (seen.append(gate(x, w, a, B)), (x @ a.t()).sum())[1])(A.detach())
    torch.func.vmap(lambda xi: (seen.append(gate(xi[None], w, A, B)), xi)[1])(x)
    assert seen == [0, 0]


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_gated_calls_give_the_full_paths_bits_and_gradients(dtype: torch.dtype, monkeypatch, seed: int) -> None:
    """Through the gate or with it off (as without the extension), the same outputs and gradients, bit for bit;
    3-D x, both biases, fan_in_fan_out, dropout (the same seed), grad mode on and off."""
    torch.manual_seed(seed)
    K, N, r = 7, 5, 3
    x = torch.randn(2, 3, K).to(dtype).requires_grad_()
    w = torch.randn(K, N).to(dtype)
    A, B = torch.randn(r, K).requires_grad_(), torch.randn(N, r).requires_grad_()
    bias, lb = torch.randn(N).to(dtype).requires_grad_(), torch.randn(N).requires_grad_()
    taken = []
    gate = ops._gate
    monkeypatch.setattr(ops, "_gate", lambda *a: taken.append(gate(*a)) or taken[-1])

    def run() -> tuple[Tensor, ...]:
        torch.manual_seed(seed + 1)
        y = kfuse.lora_linear(x, w, A, B, 0.5, bias, lb, dropout_p=0.25, fan_in_fan_out=True)
        with torch.no_grad():
            y0 = kfuse.lora_linear(x, w, A, B, 0.5, bias, lb, dropout_p=0.25, training=False, fan_in_fan_out=True)
        return (y, y0, *torch.autograd.grad(y.sum(), (x, A, B, bias, lb)))

    gated = run()
    assert taken == [2, 1]
    monkeypatch.setattr(ops, "_gate", lambda *a: 0)
    full = run()
    assert all(torch.equal(a, b) for a, b in zip(gated, full, strict=True))


_MULTI_ARGS = ("x", "weight", "A_stack", "B_stack", "scalings", "ranks", "adapter_ids", "bias")


def _multi_gate_case(rng: np.random.Generator) -> dict:
    """lora_linear_multi's arguments, each valid most of the time and otherwise wrong in one of the ways the gate
    must decline (a dtype, a shape, a device, a subclass, a lazy negation, a per-sequence id, a non-bool flag)."""
    def pick(*options):
        return options[int(rng.integers(len(options)))]

    dt = pick(torch.float32, torch.float64, torch.float16, torch.bfloat16)
    K, N, L, r_max = (int(v) for v in rng.integers(1, 6, 4))
    fifo = bool(rng.random() < 0.3)
    adt = pick(torch.float32, dt)
    lead = [int(v) for v in rng.integers(0, 4, int(rng.integers(0, 3)))]
    x = torch.randn(*lead, K).to(dt)
    ids = torch.randint(-1, L, lead, dtype=pick(torch.int32, torch.int64))  # x.shape[:-1], or flat: [M]
    ids = pick(ids, ids.reshape(-1)) if lead else ids
    args = dict(x=x, weight=torch.randn(K, N).to(dt) if fifo else torch.randn(N, K).to(dt),
                A_stack=torch.randn(L, r_max, K).to(adt), B_stack=torch.randn(L, N, r_max).to(adt),
                scalings=torch.rand(L).to(pick(torch.float32, torch.float64, torch.float16)),
                ranks=torch.randint(0, r_max + 1, (L,), dtype=pick(torch.int32, torch.int64)),
                adapter_ids=ids, bias=pick(None, torch.randn(N).to(dt)), fan_in_fan_out=fifo)
    if rng.random() < 0.6:
        name = pick(*_MULTI_ARGS, "fan_in_fan_out")
        v = args[name]
        if isinstance(v, Tensor):
            how = pick("dtype", "shape", "meta", "neg", "sub", "strided", "param", "grad", "ndim", "seq")
            if how == "dtype":
                v = v.to(torch.float64 if v.dtype != torch.float64 else torch.float32)
            elif how == "shape" and v.ndim:
                v = torch.zeros(*v.shape[:-1], v.shape[-1] + 1, dtype=v.dtype)
            elif how == "meta":
                v = v.to("meta")
            elif how == "neg" and v.dtype.is_floating_point:
                v = torch._neg_view(v)
            elif how == "sub":
                v = v.as_subclass(type("Sub", (Tensor,), {}))
            elif how == "strided" and v.ndim:
                v = torch.cat([v, v], -1)[..., ::2]  # valid: any strides
            elif how == "param" and v.dtype.is_floating_point:
                v = nn.Parameter(v, requires_grad=False)  # valid
            elif how == "grad" and v.dtype.is_floating_point:
                v = v.clone().requires_grad_()  # valid, but the reference's (the op is forward-only)
            elif how == "ndim":
                v = v[None]
            elif how == "seq" and name == "adapter_ids" and x.ndim == 3:
                v = torch.zeros(x.shape[0], dtype=v.dtype)  # one id per sequence: the full path expands it
            args[name] = v
        elif name == "fan_in_fan_out":
            args[name] = pick(0, None, "no")
        else:
            args[name] = torch.randn(N + 1)
    return args


def _multi_full_path_says(args: dict) -> str | None:
    """What lora_linear_multi's full path decides for ``args``: its route (REFERENCE when an input needs grad, as
    the op does), or None when it raises."""
    ids, x = args["adapter_ids"], args["x"]
    if (x.ndim > 2 and ids.ndim == 1 and ids.shape[0] == x.shape[0] and ids.shape[0] != math.prod(x.shape[:-1])):
        return "per-sequence ids"
    try:
        ops._validate_multi(*(args[k] for k in _MULTI_ARGS), args["fan_in_fan_out"])
    except (TypeError, ValueError):
        return None
    tensors = tuple(args[k] for k in _MULTI_ARGS)
    if torch.overrides.has_torch_function(tensors):
        return "torch_function"
    route = ops._routing.route(ops._select("lora_linear_multi", "auto", x), tensors)
    return ops._routing.REFERENCE if ops._routing.needs_grad(tensors) else route


@needs_extension
def test_multi_gate_passes_only_calls_the_full_path_validates_and_routes_eagerly(seed: int) -> None:
    """lora_linear_multi runs its implementation without _validate_multi and _routing.route when _multi_gate says
    so (its Python was 45 us of a serving call over the launcher's 16). Over 3000 random calls, valid or wrong in one
    argument, under grad mode on and off: the gate passes only what the full path validates and routes eagerly
    without gradients, and declines none of the plain, valid calls it is for."""
    rng = np.random.default_rng(seed)
    taken = declined = 0
    for i in range(3000):
        args = _multi_gate_case(rng)
        with torch.set_grad_enabled(i % 3 != 0):
            gate = ops._multi_gate(*(args[k] for k in _MULTI_ARGS), args["fan_in_fan_out"])
            said = _multi_full_path_says(args)
        if gate:
            taken += 1
            assert said == ops._routing.EAGER, (args, said)
        elif said == ops._routing.EAGER and not any(isinstance(v, Tensor) and v.is_neg() for v in args.values()):
            declined += 1
    assert taken > 500 and declined == 0, (taken, declined)


@needs_extension
def test_multi_gate_declines_traces_modes_and_transforms(seed: int) -> None:
    """The multi gate says no under a dispatch mode, autocast, a torch-function mode, forward-mode AD, vmap, and
    for an input requiring grad under grad mode (the op then warns and runs the reference)."""
    torch.manual_seed(seed)
    x, w = torch.randn(3, 5), torch.randn(4, 5)
    A, B, sc = torch.randn(2, 2, 5), torch.randn(2, 4, 2), torch.rand(2)
    rk, ids = torch.tensor([2, 1]), torch.tensor([0, -1, 1])

    def gate(x: Tensor = x, A: Tensor = A) -> bool:
        return ops._multi_gate(x, w, A, B, sc, rk, ids, None, False)

    assert gate()
    assert not gate(A=A.clone().requires_grad_())
    with torch.no_grad():
        assert gate(A=A.clone().requires_grad_())
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert not gate()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gate()

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert not gate()
    import torch.autograd.forward_ad as fwad  # noqa: PLC0415
    with fwad.dual_level():
        assert not gate(x=fwad.make_dual(x, torch.ones_like(x)))
    seen = []
    torch.func.vmap(lambda xi: (seen.append(gate(x=xi[None].expand(3, 5))), xi)[1])(x)
    assert seen == [False]


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_multi_gated_calls_give_the_full_paths_bits(dtype: torch.dtype, monkeypatch, seed: int) -> None:
    """Through the gate or with it off (as without the extension), the same output bit for bit, and the same errors
    for out-of-range ids and ranks (values the gate does not look at); 3-D x, bias, fan_in_fan_out, mixed ranks."""
    torch.manual_seed(seed)
    K, N, L, r_max = 7, 5, 3, 4
    x = torch.randn(2, 3, K).to(dtype)
    w = torch.randn(K, N).to(dtype)
    A, B = torch.randn(L, r_max, K), torch.randn(L, N, r_max)
    sc, rk, bias = torch.rand(L), torch.tensor([4, 1, 2]), torch.randn(N).to(dtype)
    ids = torch.tensor([[0, -1, 2], [1, 1, 0]])
    taken = []
    gate = ops._multi_gate
    monkeypatch.setattr(ops, "_multi_gate", lambda *a: taken.append(gate(*a)) or taken[-1])

    def run() -> Tensor:
        return kfuse.lora_linear_multi(x, w, A, B, sc, rk, ids, bias, fan_in_fan_out=True)

    gated = run()
    for bad_ids, bad_rk, err in ((ids + 3, rk, IndexError), (ids, rk + 1, ValueError)):
        with pytest.raises(err, match="adapter_ids must be in" if err is IndexError else "ranks must be in"):
            kfuse.lora_linear_multi(x, w, A, B, sc, bad_rk, bad_ids, bias, fan_in_fan_out=True)
    assert taken == [True, True, True]
    monkeypatch.setattr(ops, "_multi_gate", lambda *a: False)
    assert torch.equal(gated, run())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_transform_around_plain_inputs_runs_the_reference(backend: str, device: str, seed: int) -> None:
    """A torch.func transform running around a call whose own tensors are not wrapped (a closure's, a module's
    parameters, here lora_A requiring grad): vmap and grad over another input. The eager autograd.Function
    raised functorch's "must override setup_context" (review, 2026-12-06); the reference runs now (the gate
    declines too)."""
    x, w, B = (torch.randn(*s, device=device) for s in ((3, 5), (4, 5), (4, 2)))
    A = nn.Parameter(torch.randn(2, 5, device=device))
    want = lora_linear_reference(x, w, A, B, 0.5).detach()
    s = torch.arange(2.0, device=device)
    out = torch.func.vmap(lambda i: kfuse.lora_linear(x, w, A, B, 0.5, backend=backend) + i)(s)
    assert_close(out, want[None] + s[:, None, None], torch.float32, "vmap")
    g = torch.func.grad(lambda t: (kfuse.lora_linear(x, w, A, B, 0.5, backend=backend) * t).sum())(s[1])
    assert_close(g, want.sum(), torch.float32, "grad")
