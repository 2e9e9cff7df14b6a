"""LoRA in the benchmark report and in pytest-benchmark (:class:`kfuse.report.OpBench`).

A LoRA layer adds ``2Mr(K+N)`` FLOPs to a base GEMM of ``2MNK`` (0.8 % at r = 16, N = 4096), so
it is judged against that GEMM, measured in the same run: every row's ``ratio`` is its time over
the case's basis, beside the target of ``docs``/the issue (``target``). Cases (``mode``):

- ``fwd``: ``y = x Wᵀ + s · (x Aᵀ) Bᵀ``, x and W in the case dtype, A and B float32 (PEFT's
  default), ``s = 2`` (``lora_alpha = 32``, r = 16), no dropout (the float64 check needs the same
  mask; the kernels' dropout is tested in tests/test_lora*.py). Basis: the base GEMM ``x Wᵀ``
  (cuBLAS / BLAS). Targets: ≤ 1.05× at M ≥ 4096, ≤ 1.10× at M ≤ 128.
- ``bwd``: the backward alone (dx, dA, dB; x, A, B require grad, W frozen) of a forward run once
  before timing (``retain_graph``). Basis: one ``dY W`` GEMM. Target ≤ 1.15×. Each row also
  reports the bytes its forward saved for the backward (``saved MiB``, measured with
  ``torch.autograd.graph.saved_tensors_hooks``; distinct storages other than W, A and B: kfuse
  keeps x and ``S [M, r]`` fp32).
- ``multi``: :func:`kfuse.lora_linear_multi`, M rows over L distinct rank-r adapters (no grad).
  Basis: the base GEMM plus one read of every adapter at the copy ceiling measured in this run.
  Target ≤ 1.3×.
- ``step``: one training step (forward, loss, backward, AdamW on the adapters) of a small
  Llama-style model (random init from a ``transformers`` ``LlamaConfig``) wrapped by PEFT (r = 16
  on every linear layer of the decoder), as it is (``peft``) and after
  ``kfuse.integrations.peft.fuse`` (``fused``); tokens/s side by side (``tok/s``). Basis: the PEFT
  step. Checked: the loss and every adapter gradient against the same model in float64.

Candidates (``fwd``/``bwd``): the kfuse backends ``triton`` and ``cpu`` (skipped with the reason
where they cannot run; ``cuda`` has no LoRA kernels) with fp32 adapters, and ``triton-bf16`` /
``cpu-bf16`` (``-fp16``) with adapters in x's half dtype (the issue: fp32 adapters at the speed of
half ones; skipped for fp32 x); baselines ``base`` (the basis, checked
against its own float64 product), ``triton-gemm`` (``fwd``: kfuse's Triton forward at rank 0, i.e.
its GEMM alone, beside ``base`` to tell the main loop's cost from the low-rank term's; skipped where
Triton cannot run), ``peft`` (PEFT's ``lora.Linear``, fp32 adapters), ``peft-bf16``
(adapters cast to x's dtype; skipped for fp32 x, where it is ``peft``), ``addmm`` (the best
unfused form: ``y = x @ W.T; y.addmm_(x @ A.T, B.T, alpha=s)``, adapters in x's dtype) and
``compile`` (``torch.compile`` of PEFT's eager formula with the fp32 adapters). ``multi``: kfuse,
``base``, ``peft`` (PEFT's mixed-batch forward, ``adapter_names=``) and ``gather`` (per-row
gathered adapters and two ``bmm``: no host sync). PEFT rows are skipped, with the reason, when
peft (or transformers, for ``step``) is not installed.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kfuse
from kfuse.ops.lora import backend_reasons
from kfuse.reference.lora import acc_dtype, lora_linear_multi_reference, lora_linear_reference
from kfuse.report import Candidate, Case, Ceilings, backend_skips, dtype_name, scaled_error

NAME = "lora"
#: The kfuse backends the report times, in table order (``cuda`` names no LoRA kernels).
BACKENDS = ("triton", "cpu")
#: The adapters' dtype in every case: PEFT's default (``autocast_adapter_dtype=True``).
ADAPTER_DTYPE = torch.float32
RANK = 16
ALPHA = 32.0  # scaling = ALPHA / RANK = 2
#: Targets for the kfuse rows' ratio (time / basis).
TARGETS = {"fwd_large": 1.05, "fwd_small": 1.10, "bwd": 1.15, "multi": 1.3}

# Largest passing error (``error``: max |r − r64| / max |r64|, per tensor), per mode and dtype. bf16
# rows are dominated by rounding y (2⁻⁹ relative) and, for the bf16-adapter baselines, A, B and S.
# A training step compares the loss and ~100 adapter gradients through several layers.
_TOL = {
    "fwd": {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1.6e-2},
    "bwd": {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2},
    "step": {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1},
}


# --------------------------------------------------------------------------- cases


def gemm_case(device: torch.device, dtype: torch.dtype, mode: str, M: int, K: int, N: int, r: int = RANK,
              adapters: int | None = None) -> Case:
    """A ``fwd``/``bwd`` case (``adapters`` None) or a ``multi`` case over ``adapters`` adapters."""
    params: dict[str, Any] = {"r": r}
    if adapters is not None:
        params["adapters"] = adapters
    return Case(NAME, (M, K, N), dtype, mode, device, params)


def step_case(device: torch.device, dtype: torch.dtype, batch: int, seq: int, layers: int, hidden: int, vocab: int,
              r: int = RANK) -> Case:
    """A ``step`` case: a Llama-style model of ``layers`` × ``hidden`` (heads of 64, MLP ≈ 8/3 ×
    hidden), ``vocab`` tokens, trained on ``batch`` × ``seq`` tokens."""
    return Case(NAME, (batch, seq), dtype, "step", device, {"layers": layers, "hidden": hidden, "vocab": vocab, "r": r})


def host_bound(case: Case) -> bool:
    """GEMM cases of M ≤ 512 rows are timed back to back by the wall clock, host work included
    (``Candidate.host_bound``): below M ≈ 512 the host sets kfuse's time (H200: the op's Python ~70 µs, the
    launcher ~100 µs, its kernels 0.04 ms at M = 128), and do_bench's flush hid up to ~70 µs of it."""
    return case.mode != "step" and case.shape[0] <= 512


def cases(device: torch.device, quick: bool) -> list[Case]:
    """CUDA, bf16, K = N = 4096, r = 16, the targets' cases first (a time budget cuts the run short from
    the end): forward at M = 4096 and 128, backward at 4096, multi-adapter at M = 128 over 8
    adapters, backward at 128, a training step of an 8-layer × 1024 Llama on 4 × 512 tokens, then
    forward at M = 16384 and 1 and backward at 16384 and 1. ``quick``: forward at 4096 and 128,
    backward at 4096, the multi case, a 4-layer step on 4 × 256 tokens. CPU, fp32, K = N = 1024: forward at M = 1,
    128, 2048, multi at 128 over 8, a 2-layer × 128 step on 2 × 64 tokens, backward at 128 and 2048
    (``quick``: at 128 only; each ``torch.compile`` baseline costs seconds of compiling there)."""
    if device.type == "cuda":
        dt, K, N = torch.bfloat16, 4096, 4096
        step = step_case(device, dt, 4, 256 if quick else 512, 4 if quick else 8, 1024, 32000)
        out = [gemm_case(device, dt, "fwd", m, K, N) for m in (4096, 128)] + [gemm_case(device, dt, "bwd", 4096, K, N)]
        out.append(gemm_case(device, dt, "multi", 128, K, N, adapters=8))
        if quick:
            return [*out, step]
        out += [gemm_case(device, dt, "bwd", 128, K, N), step]
        return out + [gemm_case(device, dt, m, M, K, N) for m in ("fwd", "bwd") for M in (16384, 1)]
    else:
        dt, K, N = torch.float32, 1024, 1024
        fwd_m, bwd_m = (1, 128, 2048), ((128,) if quick else (128, 2048))
        step = step_case(device, dt, 2, 64, 2, 128, 1024)
    out = [gemm_case(device, dt, "fwd", m, K, N) for m in fwd_m]
    out += [gemm_case(device, dt, "multi", 128, K, N, adapters=8), step]
    return out + [gemm_case(device, dt, "bwd", m, K, N) for m in bwd_m]


# --------------------------------------------------------------------------- bytes and FLOPs


def fwd_bytes(M: int, K: int, N: int, r: int, x_size: int, a_size: int) -> int:
    """Forward floor: read x ``[M, K]`` and W ``[N, K]``, write y ``[M, N]`` (``x_size`` bytes per
    element), read A ``[r, K]`` and B ``[N, r]`` (``a_size``)."""
    return x_size * (M * K + N * K + M * N) + a_size * r * (K + N)


def fwd_flops(M: int, K: int, N: int, r: int) -> int:
    """Forward: the base GEMM ``2MNK`` plus the low-rank pair ``2Mr(K + N)``."""
    return 2 * M * N * K + 2 * M * r * (K + N)


def bwd_bytes(M: int, K: int, N: int, r: int, x_size: int, a_size: int, s_size: int = 4) -> int:
    """Backward floor (dx, dA, dB; W frozen): read dY ``[M, N]``, x and W, write dx ``[M, K]``;
    read S ``[M, r]`` (``s_size``, fp32); read A, B and write dA, dB (``a_size``)."""
    return x_size * (M * N + 2 * M * K + N * K) + s_size * M * r + 2 * a_size * r * (K + N)


def bwd_flops(M: int, K: int, N: int, r: int) -> int:
    """Backward: ``dx = dY W`` (``2MNK``), ``G = dY B`` and ``dB = dYᵀ S`` (``2MNr`` each),
    ``dx += G A`` and ``dA = Gᵀ x`` (``2MrK`` each)."""
    return 2 * M * N * K + 4 * M * r * (K + N)


def adapter_bytes(K: int, N: int, r: int, adapters: int, a_size: int) -> int:
    """Every adapter read once: ``L · r · (K + N)`` elements."""
    return a_size * adapters * r * (K + N)


def multi_bytes(M: int, K: int, N: int, r: int, adapters: int, x_size: int, a_size: int) -> int:
    """Multi-adapter forward floor: the forward's x, W, y, every adapter once, the int64 ids."""
    return x_size * (M * K + N * K + M * N) + adapter_bytes(K, N, r, adapters, a_size) + 8 * M


def _sizes(case: Case) -> tuple[int, int, int]:
    x_size = torch.finfo(case.dtype).bits // 8
    return x_size, torch.finfo(ADAPTER_DTYPE).bits // 8, torch.finfo(acc_dtype(case.dtype)).bits // 8


def bytes_moved(case: Case) -> int | None:
    """The floor of ``case`` (:func:`fwd_bytes`, :func:`bwd_bytes`, :func:`multi_bytes`); None for
    a training step."""
    if case.mode == "step":
        return None
    (M, K, N), r = case.shape, case.params["r"]
    x_size, a_size, s_size = _sizes(case)
    if case.mode == "fwd":
        return fwd_bytes(M, K, N, r, x_size, a_size)
    if case.mode == "bwd":
        return bwd_bytes(M, K, N, r, x_size, a_size, s_size)
    return multi_bytes(M, K, N, r, case.params["adapters"], x_size, a_size)


def flops(case: Case) -> int | None:
    """:func:`fwd_flops` (``fwd``, ``multi``: each row uses one adapter), :func:`bwd_flops`; None for
    a training step (judged by tokens/s)."""
    if case.mode == "step":
        return None
    (M, K, N), r = case.shape, case.params["r"]
    return bwd_flops(M, K, N, r) if case.mode == "bwd" else fwd_flops(M, K, N, r)


def target(case: Case) -> float | None:
    """The kfuse rows' target ratio on a GPU: forward ≤ 1.05 at M ≥ 4096 and ≤ 1.10 at M ≤ 128
    (none between), backward ≤ 1.15, multi-adapter ≤ 1.3; none for a training step, and none on the
    CPU (its ``cpu`` backend is the BLAS calls of ``addmm``; the targets are the GPU kernels')."""
    if case.device.type != "cuda":
        return None
    if case.mode == "fwd":
        M = case.shape[0]
        return TARGETS["fwd_large"] if M >= 4096 else TARGETS["fwd_small"] if M <= 128 else None
    return TARGETS.get(case.mode)


def ratio_basis(case: Case, times: dict[str, float], ceilings: Ceilings) -> tuple[float, str] | None:
    """What every row's time is divided by: the ``base`` baseline (``x@W.T``; ``dY@W`` for the
    backward; plus one read of every adapter at the measured copy rate for ``multi``), or the PEFT
    step. None when that baseline did not run."""
    if case.mode == "step":
        return (times["peft"], "peft step") if "peft" in times else None
    if "base" not in times:
        return None
    if case.mode == "multi":
        _, K, N = case.shape
        nbytes = adapter_bytes(K, N, case.params["r"], case.params["adapters"], _sizes(case)[1])
        read_ms = nbytes / ceilings.copy_gbps / 1e6
        return times["base"] + read_ms, "x@W.T+read"
    return times["base"], "dY@W" if case.mode == "bwd" else "x@W.T"


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """A ``fwd``/``bwd``/``multi`` case's tensors. ``lora_A [r, K]``, ``lora_B [N, r]`` (float32;
    ``[L, r, K]``, ``[L, N, r]`` stacks for ``multi``); ``lowp``: the same adapters in x's dtype,
    their own leaves (the bf16-adapter baselines); ``grad_y`` for ``bwd``; ``scalings``, ``ranks``,
    ``adapter_ids`` for ``multi``."""

    x: Tensor
    weight: Tensor
    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    lowp: tuple[Tensor, Tensor]
    grad_y: Tensor | None = None
    scalings: Tensor | None = None
    ranks: Tensor | None = None
    adapter_ids: Tensor | None = None


@dataclass
class StepInputs:
    """A ``step`` case: the PEFT-wrapped model (base in the case dtype, adapters float32, in train
    mode) and the tokens (``input_ids``, also the labels). Without peft or transformers, ``skip``
    says why (and ``model`` is None); ``failure`` is the error that building the model raised."""

    model: nn.Module | None
    input_ids: Tensor | None
    skip: str = ""
    failure: Exception | None = None


def _uniform(shape: Sequence[int], bound: float, gen: torch.Generator, device: torch.device) -> Tensor:
    return (torch.rand(shape, generator=gen, device=device) * 2 - 1) * bound


def make_inputs(case: Case, seed: int) -> Inputs | StepInputs:
    """Fresh inputs: ``x ~ N(0, 1)``; W, A and B as ``nn.Linear`` initialises them (U(±1/√fan_in):
    PEFT's ``init_lora_weights=False``, so that B is not zero and every gradient is exercised);
    ``grad_y ~ N(0, 1)``; ``multi``: M rows spread evenly over the adapters in random order, scalings
    ``2 / (1 + a)``. ``step``: :func:`llama_peft`."""
    if case.mode == "step":
        if why := _missing("transformers", "peft"):
            return StepInputs(None, None, skip=why)
        try:
            return StepInputs(*llama_peft(case, seed))
        except Exception as err:  # noqa: BLE001 (the PEFT row fails with it)
            return StepInputs(None, None, skip=f"building the PEFT model failed: {type(err).__name__}", failure=err)
    dev, (M, K, N), r = case.device, case.shape, case.params["r"]
    gen = torch.Generator(dev).manual_seed(seed)
    L = case.params.get("adapters")
    lead = () if L is None else (L,)
    x = torch.randn(M, K, generator=gen, device=dev).to(case.dtype)
    weight = _uniform((N, K), 1 / math.sqrt(K), gen, dev).to(case.dtype)
    A = _uniform((*lead, r, K), 1 / math.sqrt(K), gen, dev).to(ADAPTER_DTYPE)
    B = _uniform((*lead, N, r), 1 / math.sqrt(r), gen, dev).to(ADAPTER_DTYPE)
    lowp = (A.to(case.dtype), B.to(case.dtype))
    inp = Inputs(x, weight, A, B, ALPHA / r, lowp)
    if case.mode == "bwd":
        inp.grad_y = torch.randn(M, N, generator=gen, device=dev).to(case.dtype)
        for t in (x, A, B, *lowp):
            t.requires_grad_()
    elif case.mode == "multi":
        inp.scalings = torch.tensor([2.0 / (1 + a) for a in range(L)], device=dev)
        inp.ranks = torch.full((L,), r, dtype=torch.int32, device=dev)
        perm = torch.randperm(M, generator=gen, device=dev)
        inp.adapter_ids = (perm % L).to(torch.int64)
    return inp


def _llama_dims(hidden: int) -> tuple[int, int]:
    """(attention heads of 64, MLP width ≈ 8/3 × hidden rounded up to 32)."""
    return max(1, hidden // 64), 32 * math.ceil(8 * hidden / 3 / 32)


def llama_peft(case: Case, seed: int) -> tuple[nn.Module, Tensor]:
    """A ``step`` case's model and tokens: ``LlamaForCausalLM`` from a ``LlamaConfig`` (random
    init under ``seed``, base in the case dtype) wrapped by ``peft.get_peft_model`` with r = 16,
    ``lora_alpha = 32`` on q, k, v, o, gate, up and down (``init_lora_weights=False``: B random;
    adapters float32, PEFT's default), in train mode; and ``input_ids [batch, seq]``. Raises
    ImportError without transformers or peft (:func:`candidates` skips the rows then)."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 (optional)
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    p = case.params
    heads, mlp = _llama_dims(p["hidden"])
    batch, seq = case.shape
    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=mlp,
                      num_hidden_layers=p["layers"], num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max(seq, 128), tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):  # the CPU generator: the model is initialised on the CPU
        torch.random.default_generator.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        lora = LoraConfig(r=p["r"], lora_alpha=ALPHA * p["r"] / RANK, lora_dropout=0.0, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model.to(case.device, case.dtype), lora)
        ids = torch.randint(0, p["vocab"], (batch, seq), generator=torch.Generator().manual_seed(seed))
    for name, t in model.named_parameters():
        if t.requires_grad and t.dtype != ADAPTER_DTYPE:
            raise RuntimeError(f"llama_peft: PEFT left adapter {name} in {t.dtype}, not {ADAPTER_DTYPE}")
    return model.train(), ids.to(case.device)


# --------------------------------------------------------------------------- baselines


def lora_eager(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """PEFT's ``lora.Linear`` forward as a formula (no dropout): ``y = F.linear(x, W)``; x cast to
    the adapters' dtype; ``y + B(A(x)) · s``, back to x's dtype. The ``compile`` baseline."""
    y = F.linear(x, weight)
    return (y + F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B) * scaling).to(x.dtype)


def lora_addmm(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """The best unfused form (adapters in x's dtype): ``y = x @ W.T; y.addmm_(x @ A.T, B.T, alpha=s)``:
    no M×N temporary, no scaled copy of B."""
    y = torch.mm(x, weight.t())
    return y.addmm_(torch.mm(x, lora_A.t()), lora_B.t(), alpha=scaling)


def multi_gather(x: Tensor, weight: Tensor, A_stack: Tensor, B_stack: Tensor, scalings: Tensor,
                 adapter_ids: Tensor) -> Tensor:
    """Several adapters in plain PyTorch without a host sync: each row's adapter gathered
    (``A_stack[ids]``, ``B_stack[ids]``: M copies) and two batched GEMMs. Every adapter of the
    cases has the full rank (``ranks`` are not applied)."""
    xa = x.to(A_stack.dtype).unsqueeze(1)  # [M, 1, K]
    s = torch.bmm(xa, A_stack[adapter_ids].transpose(1, 2))  # [M, 1, r]
    d = torch.bmm(s, B_stack[adapter_ids].transpose(1, 2)).squeeze(1) * scalings[adapter_ids, None]
    return (torch.mm(x, weight.t()) + d).to(x.dtype)


def _missing(*modules: str) -> str:
    """Why rows needing ``modules`` are skipped ("" when all import)."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as err:
            return f"{mod} is not importable ({type(err).__name__}: {err}); PEFT rows need peft and transformers"
    return ""


class _Holder(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def peft_linear(weight: Tensor, adapters: Sequence[tuple[Tensor, Tensor]], scaling: float,
                adapter_dtype: torch.dtype, trainable: bool) -> nn.Module:
    """PEFT's ``lora.Linear`` over an ``nn.Linear`` holding ``weight`` (shared, frozen), with the
    adapters ``a0, a1, ...`` (copies of ``(A, B)`` in ``adapter_dtype``; trainable or not), made
    through the public API (``get_peft_model`` on a one-layer module, ``add_adapter``)."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 (optional)

    N, K = weight.shape
    r = adapters[0][0].shape[0]
    linear = nn.Linear(K, N, bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    cfg = LoraConfig(r=r, lora_alpha=scaling * r, target_modules=["proj"], lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(_Holder(linear), cfg, adapter_name="a0")
    for i in range(1, len(adapters)):
        model.add_adapter(f"a{i}", cfg)
    layer = model.base_model.model.proj
    for i, (A, B) in enumerate(adapters):
        for mod, t in ((layer.lora_A[f"a{i}"], A), (layer.lora_B[f"a{i}"], B)):
            mod.weight = nn.Parameter(t.detach().to(adapter_dtype, copy=True), requires_grad=trainable)
    if layer.base_layer.weight is not linear.weight or not math.isclose(layer.scaling["a0"], scaling):
        raise RuntimeError("peft_linear: PEFT did not keep the base weight or the scaling")
    return layer


def saved_bytes(forward: Callable[[], Tensor], params: Sequence[Tensor]) -> tuple[Tensor, int]:
    """``forward()`` and the bytes of the distinct storages it saved for the backward
    (``saved_tensors_hooks``), other than those of ``params``."""
    skip = {t.untyped_storage().data_ptr() for t in params}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward()
    return y, sum(seen.values())


class _Backward:
    """The backward alone: the first call runs ``forward`` (measuring the bytes it saves), each
    call then returns ``torch.autograd.grad(y, wrt, grad_y, retain_graph=True)``."""

    def __init__(self, forward: Callable[[], Tensor], wrt: Sequence[Tensor], grad_y: Tensor,
                 params: Sequence[Tensor]) -> None:
        self.forward, self.wrt, self.grad_y, self.params = forward, tuple(wrt), grad_y, tuple(params)
        self.y: Tensor | None = None
        self.saved = 0

    def __call__(self) -> tuple[Tensor, ...]:
        if self.y is None:
            self.y, self.saved = saved_bytes(self.forward, self.params)
        return torch.autograd.grad(self.y, self.wrt, self.grad_y, retain_graph=True)

    def extra(self, ms: float) -> dict[str, float]:
        return {"saved MiB": self.saved / 2**20}


def _raiser(err: Exception) -> Callable[[], Any]:
    def run() -> Any:
        raise err
    return run


def _own_check(expected: Callable[[], Tensor]) -> Callable[[Any], float]:
    """The error of a baseline computing something else (the base GEMM) against its own float64 result."""
    return lambda result: scaled_error(result, expected())


def _gemm_candidate(case: Case, inp: Inputs, name: str, kind: str, forward: Callable[..., Tensor],
                    A: Tensor, B: Tensor, params: Sequence[Tensor] = ()) -> Candidate:
    """A candidate computing ``forward(x, W, A, B, s)``: as is (``fwd``), or its backward wrt
    x, A, B (``bwd``; ``params``: W, A, B and any other parameter not counted as saved bytes)."""
    call = functools.partial(forward, inp.x, inp.weight, A, B, inp.scaling)
    if case.mode == "fwd":
        return Candidate(name, kind, call)
    run = _Backward(call, (inp.x, A, B), inp.grad_y, (inp.weight, A, B, *params))
    return Candidate(name, kind, run, extra=run.extra)


def _peft_candidate(case: Case, inp: Inputs, name: str, adapter_dtype: torch.dtype) -> Candidate:
    if why := _missing("peft"):
        return Candidate(name, "baseline", skip=why)
    try:
        layer = peft_linear(inp.weight, [(inp.lora_A, inp.lora_B)], inp.scaling, adapter_dtype, case.mode == "bwd")
    except Exception as err:  # noqa: BLE001 (a failed row, with the error)
        return Candidate(name, "baseline", _raiser(err))
    A, B = layer.lora_A["a0"].weight, layer.lora_B["a0"].weight
    return _gemm_candidate(case, inp, name, "baseline", lambda x, w, a, b, s: layer(x), A, B)


def _gemm_candidates(case: Case, inp: Inputs) -> list[Candidate]:
    skips = backend_skips(backend_reasons(inp.x), case.device)
    out = []
    half = case.dtype in (torch.float16, torch.bfloat16)
    for name in BACKENDS:
        for adapters in ("fp32", "lowp"):
            row = name if adapters == "fp32" else f"{name}-{dtype_name(case.dtype)}"
            if skips[name] or (adapters == "lowp" and not half):
                why = skips[name] or f"x is {dtype_name(case.dtype)}: the same as {name}"
                out.append(Candidate(row, "backend", skip=why))
                continue
            fn = functools.partial(kfuse.lora_linear, backend=name)
            A, B = (inp.lora_A, inp.lora_B) if adapters == "fp32" else inp.lowp
            out.append(_gemm_candidate(case, inp, row, "backend", fn, A, B))
    x, w = inp.x, inp.weight
    if case.mode == "fwd":
        check = _own_check(lambda: x.double() @ w.double().t())
        out.append(Candidate("base", "baseline", lambda: torch.mm(x, w.t()), error=check, work=gemm_work(case)))
        out.append(_triton_gemm(case, x, w, skips["triton"], check))
    else:
        dy = inp.grad_y
        out.append(Candidate("base", "baseline", lambda: torch.mm(dy, w),
                             error=_own_check(lambda: dy.double() @ w.double()), work=gemm_work(case)))
    out.append(_peft_candidate(case, inp, "peft", ADAPTER_DTYPE))
    lowp_name = f"peft-{dtype_name(case.dtype)}"
    if case.dtype in (torch.float32, torch.float64):
        out.append(Candidate(lowp_name, "baseline", skip=f"x is {dtype_name(case.dtype)}: the same as peft"))
    else:
        out.append(_peft_candidate(case, inp, lowp_name, case.dtype))
    out.append(_gemm_candidate(case, inp, "addmm", "baseline", lora_addmm, *inp.lowp))
    out.append(_gemm_candidate(case, inp, "compile", "baseline", torch.compile(lora_eager, dynamic=False),
                               inp.lora_A, inp.lora_B))
    return out


def gemm_work(case: Case) -> tuple[int, int]:
    """The base GEMM's own work (``x Wᵀ`` forward, ``dY·W`` backward: the same sizes), for its rows' rates:
    ``2·M·N·K`` flops and its three matrices' bytes."""
    (M, K, N), x_size = case.shape, _sizes(case)[0]
    return 2 * M * N * K, x_size * (M * K + N * K + M * N)


def _triton_gemm(case: Case, x: Tensor, w: Tensor, skip: str | None, check: Callable[[Any], float]) -> Candidate:
    """``triton-gemm``: kfuse's Triton forward with a rank-0 adapter, i.e. its GEMM alone (the same
    tiles, main loop and epilogue; the low-rank loop runs no iteration). A diagnostic beside ``base``:
    how far the main loop is from cuBLAS, apart from what the low-rank term adds. ``check``: base's
    (against the float64 product)."""
    if skip:
        return Candidate("triton-gemm", "baseline", skip=skip)
    from kfuse.triton_kernels import lora as lk  # noqa: PLC0415 (triton is optional)

    a0, b0 = x.new_zeros(0, x.shape[1], dtype=ADAPTER_DTYPE), w.new_zeros(w.shape[0], 0, dtype=ADAPTER_DTYPE)

    def gemm_alone() -> Tensor:
        cublas, lk._CUBLAS_MIN_M = lk._CUBLAS_MIN_M, 1 << 30  # (bf16 at large M would take cuBLAS's x Wᵀ: review)
        try:
            return lk.lora_forward(x, w, False, a0, b0, 1.0, None, None, None, 0.0, False)[0]
        finally:
            lk._CUBLAS_MIN_M = cublas

    return Candidate("triton-gemm", "baseline", gemm_alone, error=check, work=gemm_work(case))


def _multi_candidates(case: Case, inp: Inputs) -> list[Candidate]:
    skips = backend_skips(backend_reasons(inp.x), case.device)
    x, w, A, B, sc, rk, ids = inp.x, inp.weight, inp.lora_A, inp.lora_B, inp.scalings, inp.ranks, inp.adapter_ids
    out = []
    for name in BACKENDS:
        if skips[name]:
            out.append(Candidate(name, "backend", skip=skips[name]))
        else:
            out.append(Candidate(name, "backend", _no_grad(functools.partial(
                kfuse.lora_linear_multi, x, w, A, B, sc, rk, ids, backend=name))))
    out.append(Candidate("base", "baseline", lambda: torch.mm(x, w.t()),
                         error=_own_check(lambda: x.double() @ w.double().t()), work=gemm_work(case)))
    if why := _missing("peft"):
        out.append(Candidate("peft", "baseline", skip=why))
    else:
        try:
            scalings = sc.tolist()
            layer = peft_linear(w, [(A[a], B[a]) for a in range(A.shape[0])], scalings[0], ADAPTER_DTYPE, False)
            for a, s in enumerate(scalings):
                layer.scaling[f"a{a}"] = s
            names = [f"a{a}" for a in ids.tolist()]
            out.append(Candidate("peft", "baseline", _no_grad(functools.partial(layer.eval(), x, adapter_names=names))))
        except Exception as err:  # noqa: BLE001 (a failed row, with the error)
            out.append(Candidate("peft", "baseline", _raiser(err)))
    out.append(Candidate("gather", "baseline", _no_grad(functools.partial(multi_gather, x, w, A, B, sc, ids))))
    return out


def _no_grad(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    def run() -> Tensor:
        with torch.no_grad():
            return fn()
    return run


# --------------------------------------------------------------------------- the training step


def _trainable(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class _Step:
    """One training step of ``model`` (built on the first call by ``prepare``): forward with
    ``labels = input_ids``, backward, AdamW (lr 1e-5) on the trainable parameters. Returns the
    loss and ``{name: grad}`` of that step, before the update."""

    def __init__(self, prepare: Callable[[], nn.Module], input_ids: Tensor) -> None:
        self.prepare, self.input_ids = prepare, input_ids
        self.model: nn.Module | None = None

    def __call__(self) -> tuple[Tensor, dict[str, Tensor | None]]:
        if self.model is None:
            self.model = self.prepare()
            self.named = _trainable(self.model)
            self.opt = torch.optim.AdamW([p for _, p in self.named], lr=1e-5)
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(input_ids=self.input_ids, labels=self.input_ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in self.named}
        self.opt.step()
        return loss.detach(), grads

    def extra(self, ms: float) -> dict[str, float]:
        return {"tok/s": self.input_ids.numel() / ms * 1e3}


def _fused(model: nn.Module, fuse: Callable[..., Any]) -> nn.Module:
    """``fuse`` applied to a copy of ``model`` (it may work in place or return the model)."""
    m = copy.deepcopy(model)
    ret = fuse(m)
    return ret if isinstance(ret, nn.Module) else m


def _step_candidates(case: Case, inp: StepInputs) -> list[Candidate]:
    if inp.model is None:
        peft = Candidate("peft", "baseline", skip=inp.skip)
        if inp.failure is not None:
            peft = Candidate("peft", "baseline", _raiser(inp.failure))
        return [Candidate("fused", "backend", skip=inp.skip, optional=True), peft]
    try:
        fuse = importlib.import_module("kfuse.integrations.peft").fuse
        fused_skip = ""
    except (ImportError, AttributeError) as err:
        fuse, fused_skip = None, f"kfuse.integrations.peft.fuse is not importable ({type(err).__name__}: {err})"
    out = []
    if fuse is None:
        out.append(Candidate("fused", "backend", skip=fused_skip, optional=True))
    else:
        step = _Step(functools.partial(_fused, inp.model, fuse), inp.input_ids)
        out.append(Candidate("fused", "backend", step, extra=step.extra, optional=True))
    step = _Step(lambda: inp.model, inp.input_ids)
    out.append(Candidate("peft", "baseline", step, extra=step.extra))
    return out


# --------------------------------------------------------------------------- the OpBench interface


def candidates(case: Case, inputs: Inputs | StepInputs) -> list[Candidate]:
    """The kfuse backends (skipped with the reason where they cannot run), then the baselines
    (see the module's docstring); ``torch.compile`` baselines compile on their first call."""
    if case.mode == "step":
        return _step_candidates(case, inputs)
    if case.mode == "multi":
        return _multi_candidates(case, inputs)
    return _gemm_candidates(case, inputs)


def reference(case: Case, inputs: Inputs | StepInputs) -> Any:
    """The float64 reference on the same inputs: ``y`` (``fwd``, ``multi``), ``(dx, dA, dB)``
    (``bwd``), or the loss and ``{name: grad}`` of the adapters (``step``: the same model in float64)."""
    if case.mode == "step":
        if inputs.model is None:
            return None
        model = copy.deepcopy(inputs.model).double()
        loss = model(input_ids=inputs.input_ids, labels=inputs.input_ids).loss
        named = _trainable(model)
        grads = torch.autograd.grad(loss, [p for _, p in named])
        return loss.detach(), {n: g for (n, _), g in zip(named, grads, strict=True)}
    x = inputs.x.detach().double().requires_grad_(case.mode == "bwd")
    w = inputs.weight.double()
    A = inputs.lora_A.detach().double().requires_grad_(case.mode == "bwd")
    B = inputs.lora_B.detach().double().requires_grad_(case.mode == "bwd")
    if case.mode == "multi":
        return lora_linear_multi_reference(x, w, A, B, inputs.scalings.double(), inputs.ranks, inputs.adapter_ids)
    y = lora_linear_reference(x, w, A, B, inputs.scaling)
    if case.mode == "fwd":
        return y
    return torch.autograd.grad(y, (x, A, B), inputs.grad_y.double())


def _step_error(result: tuple[Tensor, dict[str, Tensor | None]], expected: tuple[Tensor, dict[str, Tensor]]) -> float:
    """The loss's relative error and each adapter gradient's scaled error, the largest. Gradients
    are matched by name, or by order and shape when a fused model renamed its parameters."""
    (loss, grads), (loss64, grads64) = result, expected
    errs = [abs(float(loss) - float(loss64)) / max(abs(float(loss64)), 1e-30)]
    if set(grads) == set(grads64):
        pairs = [(grads[n], grads64[n]) for n in grads64]
    elif len(grads) == len(grads64) and all(
            g is not None and g.shape == e.shape for g, e in zip(grads.values(), grads64.values(), strict=True)):
        pairs = list(zip(grads.values(), grads64.values(), strict=True))
    else:
        diff = sorted(set(grads) ^ set(grads64))[:4]
        raise ValueError(f"the trainable parameters differ from PEFT's ({len(grads)} vs {len(grads64)}; e.g. {diff}): "
                         "cannot compare the gradients")
    errs += [math.inf if g is None else scaled_error(g, e) for g, e in pairs]
    return max(errs)


def error(case: Case, result: Any, expected: Any) -> float:
    """``max |r − r64| / max |r64|`` (scaled, as in tests/tolerances.py): of ``y``, or the largest
    over ``dx``, ``dA``, ``dB``; for a step the larger of the loss's relative error and every
    adapter gradient's scaled error."""
    if case.mode == "step":
        return _step_error(result, expected)
    if isinstance(result, Tensor):
        return scaled_error(result, expected)
    return max(scaled_error(r, e) for r, e in zip(result, expected, strict=True))


def tolerance(case: Case) -> float:
    """fwd, multi: 1e-4 fp32, 3e-3 fp16, 1.6e-2 bf16; bwd: 1e-4, 5e-3, 3e-2; step: 1e-3, 5e-2, 1e-1."""
    return _TOL["fwd" if case.mode == "multi" else case.mode][case.dtype]


def names(case: Case) -> list[str]:
    """The candidates' names for ``case``, in table order (``bench/bench_lora.py`` parametrizes on them)."""
    if case.mode == "step":
        return ["fused", "peft"]
    if case.mode == "multi":
        return [*BACKENDS, "base", "peft", "gather"]
    gemm = ["triton-gemm"] if case.mode == "fwd" else []
    dt = dtype_name(case.dtype)
    kfuse_rows = [row for name in BACKENDS for row in (name, f"{name}-{dt}")]
    return [*kfuse_rows, "base", *gemm, "peft", f"peft-{dt}", "addmm", "compile"]
