"""kfuse.integrations.peft: PEFT models switched to kfuse's LoRA kernels match PEFT's own.

Tiny random-initialised transformers models built from configs (nothing is downloaded): a
Llama-style one (nn.Linear layers) and a GPT-2-style one (Conv1D layers, fan_in_fan_out=True),
wrapped by peft.get_peft_model. PEFT initialises lora_B to zero, which would hide most bugs, so
every adapter weight (and lora_bias) is randomised after wrapping. Each check runs the same
model (same object) through PEFT first, then through kfuse after fuse().
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap
import warnings

import gloo
import pytest
import torch
from interrupts import interrupt_each_point
from tolerances import assert_close
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as peft_lora  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import kfuse  # noqa: E402
from kfuse.integrations import peft as kp  # noqa: E402

pytestmark = [
    # transformers/PEFT deprecation chatter, not ours
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*lora_bias=True.*:UserWarning"),
]

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
H_LLAMA, H_GPT2 = 64, 48
COMPILE_BACKEND = os.environ.get("KFUSE_TEST_PEFT_COMPILE_BACKEND", "aot_eager")


# ---------------------------------------------------------------- models and runs


@pytest.fixture(autouse=True)
def one_thread():
    """The models are tiny: one intra-op thread. With torch's default two on a loaded 2-core
    machine each small op waited for a core (this file: 110 s instead of 56 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def llama(bias: bool = False, dtype: torch.dtype = torch.float32, **lora) -> nn.Module:
    cfg = LlamaConfig(hidden_size=H_LLAMA, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, attention_bias=bias, mlp_bias=bias,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    lora = {"r": 5, "lora_alpha": 7, "target_modules": LLAMA_TARGETS, **lora}
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(**lora))
    randomise(model)
    return model.to(dtype)


def gpt2(dtype: torch.dtype = torch.float32, **lora) -> nn.Module:
    cfg = GPT2Config(n_embd=H_GPT2, n_layer=2, n_head=4, vocab_size=101, n_positions=32, bos_token_id=1,
                     eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # the model's own dropout
    lora = {"r": 3, "lora_alpha": 5, "target_modules": GPT2_TARGETS, "fan_in_fan_out": True, **lora}
    model = get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(**lora))
    randomise(model)
    return model.to(dtype)


@torch.no_grad()
def randomise(model: nn.Module) -> None:
    """Non-zero adapters: every lora_A / lora_B weight and lora_B bias ~ N(0, 0.1²)."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.normal_(0.0, 0.1)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m) in (peft_lora.Linear, kp.FusedLinear)}


def embeds(hidden: int, dtype: torch.dtype, batch: int = 2, seq: int = 7) -> torch.Tensor:
    return (torch.randn(batch, seq, hidden, dtype=torch.float64) * 0.5).to(dtype)


def run(model: nn.Module, x: torch.Tensor, grads: bool = True, call=None, **kwargs) -> tuple[torch.Tensor, dict]:
    """Logits for inputs_embeds ``x``, and the gradients of a fixed function of them: of x and of
    every parameter that requires one, by name. ``call``: what runs the model (a compiled one)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(grads)
    logits = (model if call is None else call)(inputs_embeds=x, **kwargs).logits
    if not grads:
        return logits.detach(), {}
    g = torch.linspace(-1, 1, logits.numel(), dtype=torch.float64).reshape(logits.shape).to(logits.dtype)
    (logits * g).sum().backward()
    out = {"x": x.grad.detach().clone()}
    out.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    return logits.detach(), out


def assert_same(got: tuple, want: tuple, dtype: torch.dtype, what: str = "") -> None:
    (y, gg), (y0, gw) = got, want
    assert_close(y, y0, dtype, f"{what} logits")
    assert gg.keys() == gw.keys(), f"{what}: gradients of {sorted(gg.keys() ^ gw.keys())} differ in presence"
    for name in gw:
        assert_close(gg[name], gw[name], dtype, f"{what} grad {name}")


def assert_equal(got: tuple, want: tuple) -> None:
    assert torch.equal(got[0], want[0]) and got[1].keys() == want[1].keys()
    assert all(torch.equal(got[1][n], want[1][n]) for n in want[1])


class Counter:
    """Counts calls of kfuse.lora_linear / lora_linear_multi (monkeypatched on the kfuse package,
    where the integration looks them up)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = {"lora_linear": 0, "lora_linear_multi": 0}
        for name in self.calls:
            monkeypatch.setattr(kfuse, name, self._wrap(name, getattr(kfuse, name)))

    def _wrap(self, name: str, fn):
        def wrapper(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    def take(self) -> dict[str, int]:
        out = dict(self.calls)
        self.calls.update(lora_linear=0, lora_linear_multi=0)
        return out


def our_warnings(record: list) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("kfuse.integrations.peft")]


# ---------------------------------------------------------------- forward and every gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", ["plain", "rslora", "lora_bias+trainable_base"])
def test_llama_matches_peft(case: str, dtype: torch.dtype, seed: int, monkeypatch) -> None:
    """Logits and every gradient (x, each lora_A / lora_B, lora_bias, trainable base weights and
    biases) equal PEFT's; each layer's forward is one kfuse.lora_linear call."""
    if case == "plain":
        model = llama(dtype=dtype)
    elif case == "rslora":
        model = llama(dtype=dtype, use_rslora=True)
    else:
        model = llama(bias=True, dtype=dtype, lora_bias=True)
        inner = model.base_model.model.model.layers
        for base in (inner[0].self_attn.q_proj.base_layer, inner[1].mlp.down_proj.base_layer):
            base.weight.requires_grad_(True)
            base.bias.requires_grad_(True)
    layers = lora_layers(model)
    assert len(layers) == 2 * len(LLAMA_TARGETS)
    if case == "rslora":
        assert all(m.scaling["default"] == pytest.approx(7 / 5**0.5) for m in layers.values())
    x = embeds(H_LLAMA, dtype)
    want = run(model, x)
    if case.startswith("lora_bias"):
        assert any(".base_layer.weight" in n for n in want[1]) and any("lora_B.default.bias" in n for n in want[1])
    count = Counter(monkeypatch)
    report = kp.fuse(model)
    assert sorted(report.fused) == sorted(layers) and report.skipped == {}
    got = run(model, x)
    assert count.take() == {"lora_linear": len(layers), "lora_linear_multi": 0}
    assert_same(got, want, dtype, case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_gpt2_conv1d_matches_peft(dtype: torch.dtype, seed: int, monkeypatch) -> None:
    """GPT-2's Conv1D layers (weight [K, N], fan_in_fan_out=True, always a base bias), with
    lora_bias: logits and every gradient equal PEFT's."""
    model = gpt2(dtype=dtype, lora_bias=True)
    layers = lora_layers(model)
    assert len(layers) == 2 * 4 and all(m.fan_in_fan_out for m in layers.values())
    x = embeds(H_GPT2, dtype)
    want = run(model, x)
    count = Counter(monkeypatch)
    assert sorted(kp.fuse(model).fused) == sorted(layers)
    got = run(model, x)
    assert count.take()["lora_linear"] == len(layers)
    assert_same(got, want, dtype, "gpt2")


def fused_and_float64(model: nn.Module, layer: nn.Module, x: torch.Tensor, params: list) -> tuple[list, list]:
    """``[y, dx, *d params]`` of ``layer`` after ``fuse(model)``, and of PEFT's own forward on
    float64 copies of the layer's parameters (the reference for half-precision layers); the
    model is left unfused."""

    def grads(fn, x):
        x = x.detach().clone().requires_grad_(True)
        y = fn(x)
        gy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(y.dtype)
        return [y.detach(), *torch.autograd.grad((y * gy).sum(), [x, *params])]

    kp.fuse(model)
    got = grads(layer, x)
    saved = {p: p.data for p in layer.parameters()}
    try:
        for p in layer.parameters():
            p.data = p.data.double()
        kp.unfuse(model)
        want = grads(lambda t: layer(t.double()), x)
    finally:
        for p, d in saved.items():
            p.data = d
    return got, want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ["linear", "conv1d"])
def test_half_precision_layer(arch: str, dtype: torch.dtype, seed: int) -> None:
    """A half-precision base with PEFT's float32 adapters (its default upcast): the fused layer
    is within the dtype's tolerance of the float64 evaluation of the same layer, y and every
    gradient (dx in x's dtype, dA / dB / dlora_bias in float32)."""
    if arch == "linear":
        model = llama(bias=True, lora_bias=True).to(dtype)
        layer = model.base_model.model.model.layers[0].mlp.up_proj
    else:
        model = gpt2(lora_bias=True).to(dtype)
        layer = model.base_model.model.transformer.h[0].attn.c_attn
    for m in lora_layers(model).values():  # .to(dtype) cast them; PEFT keeps adapters in float32
        m.lora_A.float()
        m.lora_B.float()
    x = (torch.randn(3, 5, layer.in_features, dtype=torch.float64) * 0.5).to(dtype)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_B["default"].bias]
    got, want = fused_and_float64(model, layer, x, params)
    for name, g, w in zip(["y", "dx", "dA", "dB", "dlora_bias"], got, want, strict=True):
        assert g.dtype == (dtype if name in ("y", "dx") else torch.float32), name
        assert_close(g, w, dtype, f"{arch} {name}")


# ---------------------------------------------------------------- dropout and train / eval


def test_dropout(seed: int, monkeypatch) -> None:
    """With dropout the masks are kfuse's, not PEFT's: eval mode matches PEFT; in training the
    fused output is reproducible under torch.manual_seed, really drops, and has PEFT's
    statistics (mean and spread over many draws); p set to 0 on the live dropout modules
    matches PEFT in training mode."""
    model = llama(lora_dropout=0.4)
    x = embeds(H_LLAMA, torch.float32)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    xl = torch.randn(16, H_LLAMA)
    draws_n = 300
    model.eval()
    want_eval = run(model, x)
    model.train()
    with torch.no_grad():
        peft_draws = torch.stack([layer(xl) for _ in range(draws_n)])
    count = Counter(monkeypatch)
    kp.fuse(model)
    model.eval()
    assert_same(run(model, x), want_eval, torch.float32, "eval")
    with torch.no_grad():
        y_eval = layer(xl)
    model.train()
    torch.manual_seed(123)
    a = run(model, x)
    torch.manual_seed(123)
    assert_equal(run(model, x), a)  # reproducible: forward and backward
    assert not torch.allclose(a[0], want_eval[0], atol=1e-3), "training mode did not drop anything"
    assert a[1].keys() == want_eval[1].keys() and all(torch.isfinite(g).all() for g in a[1].values())
    count.take()
    with torch.no_grad():
        draws = torch.stack([layer(xl) for _ in range(draws_n)])
    assert count.take()["lora_linear"] == draws_n
    # E[dropout(x)] = x: the mean over the draws is the eval output, within 6 standard errors
    se = draws.std(0) / draws_n**0.5
    assert ((draws.mean(0) - y_eval).abs() <= 6 * se + 1e-6).all()
    ratio = (draws.std(0).mean() / peft_draws.std(0).mean()).item()
    assert 0.9 < ratio < 1.1, f"spread {ratio:.3f} x PEFT's"
    for m in lora_layers(model).values():  # live state: p = 0 on PEFT's own nn.Dropout modules
        m.lora_dropout["default"].p = 0.0
    got = run(model, x)
    kp.unfuse(model)
    assert_same(got, run(model, x), torch.float32, "p=0 in training")


# ---------------------------------------------------------------- adapters: several, merged, disabled, live state


def two_adapters(lora_bias: bool = False) -> nn.Module:
    model = llama(bias=lora_bias, lora_bias=lora_bias)
    model.add_adapter("other", LoraConfig(r=3, lora_alpha=4, use_rslora=True, lora_bias=lora_bias,
                                          target_modules=["q_proj", "v_proj", "down_proj"]))
    randomise(model)
    return model


@pytest.mark.parametrize("lora_bias", [False, True], ids=["no-lora-bias", "lora-bias"])
def test_two_active_adapters(lora_bias: bool, seed: int, monkeypatch) -> None:
    """set_adapter([...]): the sum of both adapters, one kfuse call of rank Σr per layer, and
    each adapter's own A, B (and lora_bias) get PEFT's gradients."""
    model = two_adapters(lora_bias)
    model.base_model.set_adapter(["default", "other"])
    x = embeds(H_LLAMA, torch.float32)
    want = run(model, x)
    assert any("lora_A.other" in n for n in want[1]) and any("lora_B.default" in n for n in want[1])
    count = Counter(monkeypatch)
    kp.fuse(model)
    got = run(model, x)
    assert count.take()["lora_linear"] == len(lora_layers(model))
    assert_same(got, want, torch.float32, "two adapters")
    # switching the active adapter after fuse is honoured (live state)
    model.base_model.set_adapter("other")
    got = run(model, x)
    kp.unfuse(model)
    assert_same(got, run(model, x), torch.float32, "other only")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_two_active_adapters_of_mixed_dtypes(dtype: torch.dtype, seed: int) -> None:
    """Two active adapters, one in x's half dtype with a lora_bias and one in float32 without:
    the concatenated adapter is float32, and the half lora_bias joins it (it was refused with a
    dtype error). y and every gradient within the dtype's tolerance of float64."""
    model = llama(lora_bias=True)
    model.add_adapter("other", LoraConfig(r=3, lora_alpha=4, target_modules=["v_proj"]))
    randomise(model)
    model = model.to(dtype)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    layer.lora_A["other"].float()
    layer.lora_B["other"].float()
    model.base_model.set_adapter(["default", "other"])
    x = (torch.randn(3, 5, layer.in_features, dtype=torch.float64) * 0.5).to(dtype)
    A, B = layer.lora_A, layer.lora_B
    params = [A["default"].weight, B["default"].weight, B["default"].bias, A["other"].weight, B["other"].weight]
    got, want = fused_and_float64(model, layer, x, params)
    names = ["y", "dx", "dA", "dB", "dlora_bias", "dA other", "dB other"]
    for name, g, w, p in zip(names, got, want, [x, x, *params], strict=True):
        assert g.dtype == p.dtype, name
        assert_close(g, w, dtype, name)


def test_live_scaling_and_merge(seed: int, monkeypatch) -> None:
    """set_scale after fuse is honoured; merge_adapter(): outputs equal (the base layer runs,
    not kfuse); unmerge_adapter(): kfuse again."""
    model = llama(bias=True, lora_bias=True)
    layers = lora_layers(model)
    x = embeds(H_LLAMA, torch.float32)
    count = Counter(monkeypatch)
    kp.fuse(model)
    fused = run(model, x)
    for m in layers.values():
        m.set_scale("default", 0.3)
    scaled = run(model, x)
    kp.unfuse(model)
    assert_same(scaled, run(model, x), torch.float32, "set_scale")
    for m in layers.values():
        m.set_scale("default", 1.0)
    kp.fuse(model)
    count.take()
    model.merge_adapter()
    merged = run(model, x)
    assert count.take()["lora_linear"] == 0
    assert_close(merged[0], fused[0], torch.float32, "merged logits")
    assert_close(merged[1]["x"], fused[1]["x"], torch.float32, "merged dx")
    model.unmerge_adapter()
    assert_same(run(model, x), fused, torch.float32, "unmerged")
    assert count.take()["lora_linear"] == len(layers)


def test_disabled_adapters(seed: int, monkeypatch) -> None:
    """with model.disable_adapter() and disable_adapter_layers(): the base model, exactly as
    PEFT gives it, without kfuse calls; enabled again: kfuse."""
    model = llama(bias=True)
    x = embeds(H_LLAMA, torch.float32)
    with model.disable_adapter():
        want = run(model, x)
    count = Counter(monkeypatch)
    kp.fuse(model)
    with model.disable_adapter():
        got = run(model, x)
    assert count.take()["lora_linear"] == 0
    assert_equal(got, want)
    model.base_model.disable_adapter_layers()
    assert torch.equal(run(model, x)[0], want[0]) and count.take()["lora_linear"] == 0
    model.base_model.enable_adapter_layers()
    run(model, x)
    assert count.take()["lora_linear"] == len(lora_layers(model))


# ---------------------------------------------------------------- mixed batches (adapter_names=)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lora_bias", [False, True], ids=["no-lora-bias", "lora-bias"])
def test_mixed_batch_adapter_names(lora_bias: bool, dtype: torch.dtype, seed: int, monkeypatch) -> None:
    """adapter_names= in eval under no_grad: kfuse.lora_linear_multi per layer, outputs equal
    PEFT's (float64 too: the scalings were rounded to float32 there); with gradients enabled PEFT's
    own forward runs (one warning) and is exact."""
    model = two_adapters(lora_bias).to(dtype).eval()
    names = ["other", "__base__", "default", "other"]
    x = embeds(H_LLAMA, dtype, batch=4)
    with torch.no_grad():
        want = run(model, x, grads=False, adapter_names=names)[0]
    count = Counter(monkeypatch)
    kp.fuse(model)
    with torch.no_grad():
        got = run(model, x, grads=False, adapter_names=names)[0]
    assert count.take() == {"lora_linear": 0, "lora_linear_multi": len(lora_layers(model))}
    assert_close(got, want, dtype, "mixed batch")
    kp._warned.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = run(model, x, grads=True, adapter_names=names)
    ours = our_warnings(record)
    assert len(ours) == 1 and "require grad" in ours[0], ours
    assert count.take() == {"lora_linear": 0, "lora_linear_multi": 0}
    kp.unfuse(model)
    assert_equal(got, run(model, x, grads=True, adapter_names=names))


def test_a_parametrized_base_weight_is_computed_once_a_call(seed: int) -> None:
    """A parametrized base weight is computed at each read: the fused forward read it twice (the call's checks,
    then the op), three times in a mixed batch, so spectral_norm's power iteration ran two or three times a call
    and its state drifted from PEFT's (module-conventions hunt, 2026-12-07). Once, as PEFT does, for one
    adapter, two active adapters and a mixed batch."""
    calls = []

    class Counted(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return w

    model = two_adapters()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj  # has both adapters
    torch.nn.utils.parametrize.register_parametrization(layer.base_layer, "weight", Counted())
    kp.fuse(model)
    x = torch.randn(4, H_LLAMA)
    with torch.no_grad():
        for active, kwargs in ((["default"], {}), (["default", "other"], {}),
                               (["default"], {"adapter_names": ["other", "__base__", "default", "other"]})):
            model.base_model.set_adapter(active)
            calls.clear()
            y = layer(x, **kwargs)
            assert len(calls) == 1, (active, kwargs)
            kp.unfuse(model)
            calls.clear()
            torch.testing.assert_close(y, layer(x, **kwargs))
            assert len(calls) == 1  # PEFT's own
            kp.fuse(model)


# ---------------------------------------------------------------- what fuse leaves to PEFT


def test_unservable_layers_skipped_with_one_warning(seed: int, monkeypatch) -> None:
    """A DoRA adapter on v_proj and a LoRA Embedding: those layers stay PEFT's, named in ONE
    warning and in the report; the rest fuse, and the model still matches PEFT, DoRA active
    or not."""
    model = llama(target_modules=[*LLAMA_TARGETS, "embed_tokens"])
    model.add_adapter("dora", LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["v_proj"]))
    randomise(model)
    ids = torch.randint(0, 101, (2, 7))
    want = model(input_ids=ids).logits.detach()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = kp.fuse(model)
    ours = our_warnings(record)
    assert len(ours) == 1, ours
    skipped = {"base_model.model.model.embed_tokens", "base_model.model.model.layers.0.self_attn.v_proj",
               "base_model.model.model.layers.1.self_attn.v_proj"}
    assert set(report.skipped) == skipped
    assert all(name in ours[0] for name in skipped) and "DoRA" in ours[0] and "Embedding" in ours[0]
    assert "DoRA" in report.skipped["base_model.model.model.layers.0.self_attn.v_proj"]
    assert len(report.fused) == 2 * (len(LLAMA_TARGETS) - 1)
    assert sorted(kp.fused_layers(model)) == sorted(report.fused)
    count = Counter(monkeypatch)
    assert_close(model(input_ids=ids).logits, want, torch.float32, "default adapter")
    assert count.take()["lora_linear"] == len(report.fused)
    model.base_model.set_adapter("dora")  # DoRA on the unfused v_proj; no "dora" adapter elsewhere
    got = model(input_ids=ids).logits.detach()
    assert count.take()["lora_linear"] == 0
    kp.unfuse(model)
    assert torch.equal(got, model(input_ids=ids).logits)


class _Quantized(torch.Tensor):
    """A stand-in for a quantized / sharded weight: any tensor subclass."""


def test_subclass_weights_and_patched_forwards_stay_peft(seed: int) -> None:
    """A base weight that is a tensor subclass (what quantized and sharded weights are) and a layer
    whose forward is already replaced on the instance (an accelerate hook) are left to PEFT with
    the reason; the model's output is PEFT's."""
    model = llama()
    layers = model.base_model.model.model.layers
    q = layers[0].self_attn.q_proj
    q.base_layer.weight = nn.Parameter(q.base_layer.weight.detach().as_subclass(_Quantized), requires_grad=False)
    o = layers[1].self_attn.o_proj
    o.forward = o.forward  # a bound method stored on the instance, as hooks do
    ids = torch.randint(0, 101, (2, 7))
    want = model(input_ids=ids).logits.detach()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = kp.fuse(model)
    name = "base_model.model.model.layers.{}.self_attn.{}_proj"
    assert "_Quantized" in report.skipped[name.format(0, "q")]
    assert "quantized or sharded" in report.skipped[name.format(0, "q")]
    assert "already replaced" in report.skipped[name.format(1, "o")]
    assert len(report.skipped) == 2 and len(our_warnings(record)) == 1
    assert_close(model(input_ids=ids).logits, want, torch.float32, "partly fused")


def test_runtime_fallbacks_are_peft_exactly(seed: int, monkeypatch) -> None:
    """Calls the fused forward does not serve run PEFT's own forward (one warning per reason):
    several active adapters with dropout in training (the same draws as PEFT under the same
    seed), a forward hook on a base layer."""
    model = llama()
    model.add_adapter("other", LoraConfig(r=3, lora_alpha=4, lora_dropout=0.1, target_modules=["q_proj"]))
    randomise(model)
    model.base_model.set_adapter(["default", "other"])
    model.train()
    layers = lora_layers(model)
    x = embeds(H_LLAMA, torch.float32)
    torch.manual_seed(5)
    want = run(model, x)
    count = Counter(monkeypatch)
    kp.fuse(model)
    kp._warned.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.manual_seed(5)  # q_proj runs PEFT's forward, which draws PEFT's masks; nothing else draws
        got = run(model, x)
        run(model, x)
    ours = our_warnings(record)
    assert len(ours) == 1 and "one mask per adapter" in ours[0], ours
    assert count.take()["lora_linear"] == 2 * (len(layers) - 2)  # all but the two q_proj
    assert_same(got, want, torch.float32, "two adapters with dropout")
    q = model.base_model.model.model.layers[1].self_attn.q_proj
    xq = torch.randn(4, H_LLAMA)
    torch.manual_seed(6)
    got = q(xq)
    kp.unfuse(model)
    torch.manual_seed(6)
    assert torch.equal(got, q(xq))

    kp.fuse(model)
    model.eval()
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    handle = layer.base_layer.register_forward_hook(lambda mod, args, out: out * 2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = layer(xq)
    assert any("hooks" in w for w in our_warnings(record)) and count.take()["lora_linear"] == 0
    kp.unfuse(model)
    assert torch.equal(got, layer(xq))
    handle.remove()


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16])
def test_autocast_runs_fused_as_peft_does(adapter_dtype, seed: int, monkeypatch) -> None:
    """Under torch.autocast (bf16) a fused layer runs kfuse, not PEFT's fallback, with autocast's casts:
    a float32 input and base weight in bf16, float32 adapters kept (S in float32), half ones cast to
    bf16; the output is bf16, and it and the adapters' gradients match PEFT's own under the same
    autocast (the first fallback took kfuse's inner GEMMs one by one into mixed dtypes). The input may
    be bf16 beside a float32 base weight, as an autocast layer before hands it on."""
    model = llama()
    randomise(model)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    layer.to(torch.float32)
    for m in (layer.lora_A["default"], layer.lora_B["default"]):
        m.to(adapter_dtype)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    x = torch.randn(5, H_LLAMA)

    def step(inp):
        for p in params:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(inp)
        (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        return y.detach(), [p.grad.clone() for p in params]

    want = [step(x), step(x.bfloat16())]
    count = Counter(monkeypatch)
    kp.fuse(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = [step(x), step(x.bfloat16())]
    assert not our_warnings(record) and count.take()["lora_linear"] == 2
    for (y, g), (y0, g0) in zip(got, want, strict=True):
        assert y.dtype == y0.dtype == torch.bfloat16
        assert_close(y, y0, torch.bfloat16, "y")
        for a, b, p in zip(g, g0, params, strict=True):
            assert a.dtype == p.dtype
            assert_close(a, b, torch.bfloat16, "adapter grad")


# ---------------------------------------------------------------- fuse / unfuse themselves


def test_unfuse_restores_peft(seed: int) -> None:
    """unfuse puts PEFT's forward back (the class's own, no instance attribute left): outputs
    bit for bit as before fuse. fuse twice is harmless; unfuse of an unfused model is a no-op;
    a fused model pickles and deep-copies."""
    model = gpt2(lora_bias=True)
    x = embeds(H_GPT2, torch.float32)
    before = run(model, x)
    layers = lora_layers(model)
    report = kp.fuse(model)
    assert sorted(kp.fuse(model).fused) == sorted(report.fused) == sorted(layers)
    assert all(type(m) is kp.FusedLinear and "forward" not in m.__dict__ for m in layers.values())
    # a fused model pickles and deep-copies, fused
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert sorted(kp.fused_layers(twin)) == sorted(layers)
        assert_same(run(twin, x), before, torch.float32, "copy")
    back = kp.unfuse(model)
    assert sorted(back.unfused) == sorted(layers) and back.fused == [] and kp.fused_layers(model) == []
    for m in layers.values():
        assert type(m) is peft_lora.Linear and "forward" not in m.__dict__ and "_kfuse_backend" not in m.__dict__
    assert_equal(run(model, x), before)
    assert kp.unfuse(model).unfused == []
    assert "8 layer(s) fused" in str(report)


_FSDP = textwrap.dedent("""
    import torch, torch.distributed as dist
    from peft.tuners import lora as peft_lora
    from torch.distributed.fsdp import FSDPModule, fully_shard
    import kfuse, kfuse.integrations.peft as kp
    from test_peft import H_LLAMA, embeds, lora_layers, llama, run
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    model = llama()
    x = embeds(H_LLAMA, torch.float32)
    want = run(model, x, grads=False)[0]
    names = sorted(lora_layers(model))
    kp.fuse(model)
    for m in model.modules():
        if isinstance(m, peft_lora.Linear):
            fully_shard(m)  # the layer's class becomes FSDPFusedLinear(FSDPModule, FusedLinear)
    fully_shard(model)
    assert sorted(kp.fused_layers(model)) == names
    calls = []
    real = kfuse.lora_linear
    kfuse.lora_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
    torch.testing.assert_close(run(model, x, grads=False)[0], want)
    assert calls, "the fused layers did not run kfuse"
    assert sorted(kp.unfuse(model).unfused) == names and kp.fused_layers(model) == []
    layers = [m for m in model.modules() if isinstance(m, peft_lora.Linear)]
    assert all(isinstance(m, FSDPModule) and not isinstance(m, kp.FusedLinear) for m in layers)
    calls.clear()
    torch.testing.assert_close(run(model, x, grads=False)[0], want)
    assert not calls, "kfuse ran after unfuse"
    again = kp.fuse(model, warn=False)  # a wrapper's class is not PEFT's own: skipped, saying so
    assert again.fused == [] and sorted(again.skipped) == names
    assert all("fuse before wrapping" in why for why in again.skipped.values()), again.skipped
    dist.destroy_process_group()
    print("ok")
""")


def test_fused_layers_wrapped_by_fully_shard_unfuse(tmp_path) -> None:
    """fully_shard (FSDP2) gives each layer it wraps a subclass of the layer's class (FSDPFusedLinear):
    fused_layers and unfuse looked for FusedLinear exactly, missed them, and kfuse kept serving the layers
    after unfuse (FSDP hunt, 2026-12-06). They are found, and unfuse gives them the same wrapper's subclass of
    PEFT's lora.Linear; fuse then leaves them, saying why. (One gloo process.)"""
    assert gloo.run_one(_FSDP, tmp_path).strip() == "ok"


def test_unfuse_rebinds_hooks_added_after_fuse(seed: int, monkeypatch) -> None:
    """A hook added after fuse (accelerate's: the fused forward kept on the instance as _old_forward,
    called through the hook's forward) ran kfuse after unfuse, while fused_layers said none was fused
    (bug hunt). unfuse rebinds it to PEFT's forward; removing the hook then leaves PEFT's too."""
    hooks = pytest.importorskip("accelerate.hooks")
    model = llama()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, q.in_features)
    want = q(x).detach()
    kp.fuse(model)
    hooks.add_hook_to_module(q, hooks.ModelHook())
    kp.unfuse(model)
    counter = Counter(monkeypatch)
    assert kp.fused_layers(model) == [] and torch.equal(q(x), want)
    hooks.remove_hook_from_module(q)
    assert torch.equal(q(x), want) and counter.take() == {"lora_linear": 0, "lora_linear_multi": 0}


def test_unfuse_interrupted_anywhere_is_completed_by_unfuse(seed: int, monkeypatch) -> None:
    """A KeyboardInterrupt at every interrupt point in turn of unfuse on a layer with a hook added after fuse:
    raised as the layer's class was switched back, the hook still ran kfuse and a second unfuse no longer saw
    the layer as fused (process hunt, 2026-12-07). After each, unfuse again leaves PEFT's forward alone."""
    hooks = pytest.importorskip("accelerate.hooks")
    torch.manual_seed(seed)
    proto = get_peft_model(_One(), LoraConfig(r=4, target_modules=["a"])).eval()
    x = torch.randn(3, 16)
    counter = Counter(monkeypatch)

    def setup():
        model = copy.deepcopy(proto)
        kp.fuse(model)
        hooks.add_hook_to_module(model.base_model.model.a, hooks.ModelHook())
        return model

    def check(model, interrupted):
        kp.unfuse(model)
        counter.take()
        with torch.no_grad():
            model(x)
        assert kp.fused_layers(model) == [] and counter.take() == {"lora_linear": 0, "lora_linear_multi": 0}

    assert interrupt_each_point(setup, kp.unfuse, check) > 5


def test_fused_model_frees_at_del_and_replicas_use_their_parameters(seed: int, monkeypatch) -> None:
    """A fused layer holds no reference to itself: ``del model`` frees its weights at once (no
    garbage-collector pass: on a GPU, ``del model; torch.cuda.empty_cache()`` returns the memory),
    and ``nn.DataParallel``'s replicas (``torch.nn.parallel.replicate``, which copies each module's
    instance dict) compute with their own parameter copies. No second GPU here: the broadcast is
    a CPU copy that doubles each parameter, so a replica's output tells which parameters it used."""
    import gc  # noqa: PLC0415
    import importlib  # noqa: PLC0415
    import weakref  # noqa: PLC0415

    rep = importlib.import_module("torch.nn.parallel.replicate")  # the module (the package exports the function)

    for fused in (False, True):
        model = llama()
        if fused:
            kp.fuse(model)
        weight = weakref.ref(next(iter(lora_layers(model).values())).base_layer.weight)
        gc.disable()
        try:
            del model
            assert weight() is None, f"fused={fused}: the model outlived del"
        finally:
            gc.enable()

    def doubled(tensors, devices, detach=False):
        return [[(t.detach() if detach else t) * 2.0 for t in tensors] for _ in devices]

    monkeypatch.setattr(rep, "_broadcast_coalesced_reshape", doubled)
    x = embeds(H_LLAMA, torch.float32)
    for fused in (False, True):
        model = llama()
        if fused:
            kp.fuse(model)
        layer = next(iter(lora_layers(model).values()))
        replica = rep.replicate(layer, devices=[0, 1])[1]
        assert type(replica) is type(layer)
        twin = copy.deepcopy(layer)
        for p in twin.parameters():
            p.data.mul_(2.0)
        with torch.no_grad():
            assert_close(replica(x), twin(x), torch.float32, f"fused={fused}")


def test_fuse_api(seed: int) -> None:
    """Bad arguments raise naming them; a model without PEFT layers warns; an explicit backend
    reaches the op; `import kfuse` does not import peft."""
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        kp.fuse("not a model")
    model = gpt2()
    with pytest.raises(ValueError, match="backend"):
        kp.fuse(model, backend="bogus")
    with pytest.raises(TypeError, match="kfuse.integrations.peft.fuse: backend must be a str, .* got int"):
        kp.fuse(model, backend=1)  # (a ValueError before, where the ops' was a TypeError)
    with pytest.warns(UserWarning, match="no PEFT layer"):
        assert kp.fuse(nn.Linear(3, 4)).fused == []
    x = embeds(H_GPT2, torch.float32)
    want = run(model, x)
    kp.fuse(model, backend="reference")
    assert_same(run(model, x), want, torch.float32, "reference backend")
    # fuse on fused layers sets their backend anew (values alike on every backend: LoRA's "cuda" names no kernels
    # and refuses every call, so the backend is seen to reach the op)
    assert kp.fuse(model, backend="cuda").fused
    with pytest.raises(kfuse.BackendUnavailableError, match="cuda"):
        run(model, x)
    kp.fuse(model, backend="cpu")
    assert_same(run(model, x), want, torch.float32, "cpu backend after a re-fuse")
    code = "import sys, kfuse; assert 'peft' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


class _One(nn.Module):
    """One 16 × 16 linear layer ``a``: the smallest model PEFT adapts."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


def test_fallback_warnings_do_not_keep_adapter_names() -> None:
    """A server adding and deleting a DoRA adapter per request (PEFT runs those calls): the warn-once set kept
    every adapter's name and warned for each (leak hunt, 2026-12-05). One warning per kind of reason."""

    model = get_peft_model(_One(), LoraConfig(r=4, target_modules=["a"])).eval()
    kp.fuse(model, warn=False)
    kp._warned.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for i in range(5):
            model.add_adapter(f"req-{i}", LoraConfig(r=2, target_modules=["a"], use_dora=True))
            kp.fuse(model, warn=False)
            model.set_adapter(f"req-{i}")
            with torch.no_grad():
                model(torch.randn(2, 16))
            model.set_adapter("default")
            model.delete_adapter(f"req-{i}")
    ours = our_warnings(record)
    assert len(ours) == 1 and "DoRA" in ours[0] and len(kp._warned) == 1, (ours, kp._warned)


def test_fuse_warning_text_does_not_name_the_adapters() -> None:
    """fuse()'s warning about layers left to PEFT named the adapter ("adapter 'req-3' uses DoRA"): a server
    fusing each request's adapter made a new text per adapter, one more entry in the caller's
    __warningregistry__ each (memory hunt, 2026-12-07). The Report still names it."""
    model = get_peft_model(_One(), LoraConfig(r=4, target_modules=["a"])).eval()
    reasons = set()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for i in range(3):
            model.add_adapter(f"req-{i}", LoraConfig(r=2, target_modules=["a"], use_dora=True))
            report = kp.fuse(model)
            reasons |= set(report.skipped.values())
            kp.unfuse(model)
            model.delete_adapter(f"req-{i}")
    texts = {str(w.message) for w in record if "left to PEFT" in str(w.message)}
    assert len(texts) == 1 and "an adapter uses DoRA" in texts.pop(), texts
    assert len(reasons) == 3 and all(f"'req-{i}'" in " ".join(reasons) for i in range(3)), reasons


def test_disabled_input_dtype_casting_falls_back_with_its_reason(seed: int) -> None:
    """Under peft.helpers.disable_input_dtype_casting, float32 adapters on a bf16 layer cannot take a bf16 input:
    the call is PEFT's (its own dtype error, as unfused), and the warning says why (it said "its dtype
    (torch.float32) is neither float32 nor the input's": PEFT-configs hunt). With casting on, kfuse runs it."""
    from peft.helpers import disable_input_dtype_casting  # noqa: PLC0415

    model = get_peft_model(_One().to(torch.bfloat16), LoraConfig(r=4, target_modules=["a"])).eval()
    kp.fuse(model, warn=False)
    kp._warned.clear()
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        model(x)
        assert not our_warnings(record)
        with disable_input_dtype_casting(model), pytest.raises(RuntimeError, match="same dtype"):
            model(x)
    ours = our_warnings(record)
    assert len(ours) == 1 and "input dtype casting is disabled" in ours[0] and "neither" not in ours[0], ours


def test_export_records_the_fused_op(seed: int) -> None:
    """torch.export (its default, non-strict mode: the parameters become fake tensors) of a fused model
    records kfuse's LoRA op, as the strict mode and torch.compile do; the fused layers took the fake
    parameters for tensor subclasses and ran PEFT's forward, silently (compile hunt, 2026-12-05)."""
    model = llama().eval()
    kp.fuse(model)
    x = embeds(H_LLAMA, torch.float32)

    class Logits(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, e: torch.Tensor) -> torch.Tensor:
            return self.m(inputs_embeds=e).logits

    ep = torch.export.export(Logits(model), (x,))
    assert sum("kfuse" in str(n.target) for n in ep.graph.nodes) == len(lora_layers(model))
    with torch.no_grad():
        assert_close(ep.module()(x), model(inputs_embeds=x).logits, torch.float32, "exported")


def test_compile_fullgraph_llama(seed: int) -> None:
    """torch.compile(fullgraph=True) of the fused Llama-style PEFT model, forward and backward:
    the graph holds kfuse's registered LoRA op for each layer and matches eager. Dynamo and
    AOTAutograd (the fakes and the registered autograd) run with the aot_eager backend: Inductor's
    C++ build of the whole model took 60-100 s on a 2-core machine (matching eager to 2e-7);
    KFUSE_TEST_PEFT_COMPILE_BACKEND=inductor runs it."""
    torch._dynamo.reset()
    model = llama(bias=True, lora_bias=True)
    x = embeds(H_LLAMA, torch.float32)
    kp.fuse(model)
    eager = run(model, x)
    seen = []

    def backend(gm, example_inputs):  # Dynamo's graph, then AOTAutograd's forward and backward
        seen.append(sum(1 for n in gm.graph.nodes if "kfuse" in str(n.target)))
        return torch._dynamo.lookup_backend(COMPILE_BACKEND)(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got = run(model, x, call=compiled)
    assert seen == [len(lora_layers(model))], seen
    assert_same(got, eager, torch.float32, "compiled")
