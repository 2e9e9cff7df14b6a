"""Hugging Face PEFT's LoRA layers on kfuse's kernels, in place: :func:`fuse` and :func:`unfuse`.

``fuse(model)`` switches each PEFT ``lora.Linear`` it can serve (over an ``nn.Linear``, or a
GPT-2 ``Conv1D`` with ``fan_in_fan_out=True``) to :class:`FusedLinear`, the subclass whose
forward computes the layer with :func:`kfuse.lora_linear`, by setting that layer's class;
``unfuse(model)`` sets ``lora.Linear`` back, PEFT's forward. Parameters, buffers, adapters and
the state dict are untouched: the fused forward reads the layer's live PEFT state on every call, so everything
PEFT does to a layer after ``fuse`` (``set_adapter``, ``merge_adapter``, ``disable_adapter()``,
``add_adapter``/``load_adapter``, ``set_scale``, ``train()``/``eval()``, an optimizer step) is
honoured. Per call, mirroring ``peft.tuners.lora.layer.Linear.forward`` (PEFT 0.21):

- adapters disabled (``with model.disable_adapter():``, ``disable_adapter_layers()``) or merged
  (``merge_adapter()``): PEFT's forward, which is the base layer alone (and unmerges a disabled
  merged layer, as PEFT does); there is nothing to fuse.
- no active adapter on this layer: PEFT's forward (the base layer alone).
- one active adapter: ``kfuse.lora_linear(x, W, A, B, scaling, bias, lora_bias, p)``, with the
  dropout module's ``p`` when that module is in training mode.
- several active adapters (``set_adapter([...])``): one ``kfuse.lora_linear`` call of rank Σr,
  ``A = cat(A_i)``, ``B = cat(s_i·B_i)``, ``lora_bias = Σ s_i·lora_bias_i``, scaling 1. These are
  built with autograd, so each adapter's own A, B and lora_bias get their gradients.
- ``adapter_names=`` (a mixed batch, PEFT's ``_mixed_batch_forward``): ``kfuse.lora_linear_multi``
  over padded stacks of the named adapters (per-row ``lora_bias`` added after), when nothing
  needs a gradient and no dropout is active.

Everything else runs PEFT's own forward for that call, with one warning per reason (not under
``torch.compile``): several active adapters with dropout active (PEFT draws one mask per
adapter), a mixed batch that needs gradients or dropout, an adapter that is a LoRA variant
(DoRA, ...) or whose modules were replaced or hooked, dropout ``p >= 1`` or in place, extra
forward arguments, an ``x`` whose dtype or device differs from the base weight's (under autocast:
a dtype autocast does not cast), adapters whose dtype is neither float32 nor x's (nor x's under
``disable_input_dtype_casting``), a scaling that is a tensor (``prepare_model_for_compiled_hotswap``), forward
hooks on the base layer or adapter modules. Such calls are exact (they are PEFT's); they only are not fused.

Layers ``fuse`` does not switch at all (left to PEFT and listed, with reasons, in one warning
and in the returned :class:`Report`): LoRA layers other than the plain ``lora.Linear``
(Embedding, Conv, MultiheadAttention, bitsandbytes/GPTQ/AWQ/torchao/... quantized, tensor
parallel), any adapter with a LoRA variant (DoRA, ...), a base layer that is not ``nn.Linear`` /
``Conv1D`` or whose weight is a tensor subclass (quantized, DTensor), a layer whose ``forward``
was already replaced on the instance (an accelerate hook), other PEFT tuners' layers.

Numerics: kfuse accumulates in float32 (float64 for float64) and keeps the LoRA branch in float32;
the Triton kernels round y once, where PEFT rounds the base output and the LoRA branch separately;
the cpu backend rounds a half base product to half first, as PEFT's ``F.linear`` does (torch's CPU
half GEMM has no float32 output, and casting W instead made a float32 copy of it at every call and
ran 3-4x slower on CPUs with bf16 arithmetic). Dropout masks come from kfuse's seeded
generator (``torch.manual_seed`` reproduces them), so with dropout the outputs differ from
PEFT's draw for draw but not in distribution. The layout of the base weight comes from the
base layer's class (``Conv1D`` stores ``[K, N]``), as the base layer's own forward does; PEFT's
``fan_in_fan_out`` flag only matters to merging, which stays PEFT's.
"""

from __future__ import annotations

import numbers
import re
import types
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

import kfuse
from kfuse import _backends, _routing
from kfuse.reference.lora import acc_dtype

try:
    from peft.tuners.lora import layer as _lora
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.pytorch_utils import Conv1D
except ImportError as e:  # pragma: no cover (the tests install peft)
    raise ImportError("kfuse.integrations.peft needs the `peft` package (which brings `transformers`): "
                      "pip install peft") from e

__all__ = ["FusedLinear", "Report", "fuse", "fused_layers", "unfuse"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PLAIN = (Tensor, nn.Parameter)
_BASE_FORWARDS = (nn.Linear.forward, Conv1D.forward)
# The keyword arguments PEFT's Linear.forward takes itself (VARIANT_KWARG_KEYS: for variants only).
_VARIANT_KWARGS = tuple(getattr(_lora, "VARIANT_KWARG_KEYS", ("alora_offsets",)))


def _plain(t: Tensor) -> bool:
    """A plain tensor or parameter, or the fake tensor non-strict ``torch.export`` swaps in for one (the
    layer ran PEFT's forward there, and the exported program held no kfuse op; compile hunt, 2026-12-05)."""
    return type(t) in _PLAIN or is_fake(t)
# PEFT's non-linear LoRA layers, named in the skip reasons.
_OTHER_LORA_KINDS = tuple(c for c in (getattr(_lora, n, None) for n in ("_ConvNd", "MultiheadAttention",
                                                                          "ParamWrapper")) if isinstance(c, type))


@dataclass
class Report:
    """What :func:`fuse` or :func:`unfuse` did, by module name (``model.named_modules()``).

    Attributes:
        fused: layers now served by kfuse (:func:`fuse`; layers fused before are listed too).
        skipped: PEFT layers left to PEFT, each with the reason (:func:`fuse`).
        unfused: layers switched back to PEFT's forward (:func:`unfuse`).
    """

    fused: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    unfused: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"kfuse.integrations.peft: {len(self.fused)} layer(s) fused, {len(self.skipped)} left to PEFT, "
                 f"{len(self.unfused)} unfused"]
        lines += [f"  left to PEFT: {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------- which layers fuse serves


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run anything besides its class's forward: forward or
    backward hooks of its own (global hooks are checked by :func:`_global_hooks`)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    m = torch.nn.modules.module
    return bool(getattr(m, "_global_forward_hooks", None) or getattr(m, "_global_forward_pre_hooks", None)
                or getattr(m, "_global_backward_hooks", None) or getattr(m, "_global_backward_pre_hooks", None))


def _variant_name(layer: nn.Module, adapter: str) -> str:
    if layer.use_dora.get(adapter, False):
        return "DoRA (use_dora=True)"
    return f"the LoRA variant {type(layer.lora_variant[adapter]).__name__}"


def _skip_reason(module: nn.Module) -> str | None:
    """Why :func:`fuse` leaves ``module`` (a PEFT tuner layer) to PEFT, or None if it serves it."""
    cls = f"{type(module).__module__}.{type(module).__qualname__}"
    if not isinstance(module, _lora.LoraLayer):
        return f"{cls} is not a LoRA layer (another PEFT tuner)"
    if type(module) is not _lora.Linear:
        if isinstance(module, _lora.Embedding):
            return "a LoRA Embedding layer: kfuse serves linear layers only"
        if isinstance(module, _OTHER_LORA_KINDS):
            return f"a LoRA {type(module).__name__} layer: kfuse serves linear layers only"
        if isinstance(module, _lora.Linear) and _lora.Linear in type(module).__bases__:
            return (f"its class {cls} is a wrapper's subclass of lora.Linear (fully_shard's, say): fuse before "
                    "wrapping")
        return (f"{cls} is not PEFT's plain lora.Linear (quantized, tensor-parallel and other LoRA layer types "
                "stay with PEFT)")
    if "forward" in module.__dict__:
        return "its forward is already replaced on the instance (an accelerate hook or another patch)"
    base = module.base_layer
    if isinstance(base, BaseTunerLayer):
        return f"its base layer is another PEFT layer ({type(base).__name__})"
    if type(base).forward not in _BASE_FORWARDS or "forward" in base.__dict__:
        return f"its base layer ({type(base).__name__}) is neither torch.nn.Linear nor transformers' Conv1D"
    weight, bias = base.weight, getattr(base, "bias", None)
    if type(weight) not in _PLAIN or weight.dtype not in _FLOATS or weight.ndim != 2:
        return (f"its base weight is a {type(weight).__name__} of dtype {weight.dtype} (quantized or sharded): "
                "kfuse needs a plain float16/bfloat16/float32/float64 tensor")
    if bias is not None and type(bias) not in _PLAIN:
        return f"its base bias is a {type(bias).__name__} (a tensor subclass)"
    variant = next(iter(module.lora_variant), None)  # DoRA, aLoRA, ...: any adapter, active or not
    if variant is not None:
        return f"adapter {variant!r} uses {_variant_name(module, variant)}"
    dora = next(iter(module.lora_magnitude_vector), None)
    if dora is not None:
        return f"adapter {dora!r} uses DoRA (use_dora=True)"
    return None


class FusedLinear(_lora.Linear):
    """PEFT's ``lora.Linear`` with kfuse's forward: :func:`fuse` sets a layer's class to this
    subclass and :func:`unfuse` sets it back; the layer's state is untouched. A class, not a
    forward stored on the instance: such a forward holds its layer, so the layer would be in a
    reference cycle (a deleted model's memory waited for the garbage collector) and copies that
    share the instance dict (``nn.DataParallel``'s replicas) would compute with the original
    layer. A class binds ``self`` to whichever module is called, and pickles by name."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """PEFT's ``lora.Linear.forward`` (same arguments) on kfuse's kernels, or PEFT's own where kfuse cannot
        serve the call."""
        return _fused_forward(self, x, *args, **kwargs)


def _is_fused(module: nn.Module) -> bool:
    # isinstance: a wrapper may subclass the layer's class after fuse (fully_shard makes FSDPFusedLinear), and
    # unfuse and fused_layers then missed it, kfuse still serving the layer (FSDP hunt, 2026-12-06).
    return isinstance(module, FusedLinear)


_unfused_classes: dict[type, type] = {}


def _unfused_class(cls: type) -> type:
    """The class ``unfuse`` gives a layer of class ``cls``: ``lora.Linear`` for :class:`FusedLinear`, and for a
    wrapper's subclass of it (``fully_shard``'s ``FSDPFusedLinear(FSDPModule, FusedLinear)``) the same subclass
    of ``lora.Linear``, so the wrapper's methods stay."""
    if cls is FusedLinear:
        return _lora.Linear
    if cls not in _unfused_classes:
        bases = tuple(_unfused_class(b) if isinstance(b, type) and issubclass(b, FusedLinear) else b
                      for b in cls.__bases__)
        name = cls.__name__.replace("FusedLinear", "Linear")
        body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        _unfused_classes[cls] = type(name, bases, {**body, "__qualname__": name, "__module__": __name__})
    return _unfused_classes[cls]


# ---------------------------------------------------------------- the fused forward


_warned: set[str] = set()
# An adapter's name in a reason: left out of the warn-once key, or a server adding and deleting adapters per
# request kept every name (and warned for each) for good (leak hunt, 2026-12-05).
_ADAPTER_NAME = re.compile(r"""adapter (?:'[^']*'|"[^"]*")""")


def _peft(self: nn.Module, reason: str | None, x: object, args: tuple, kwargs: dict) -> Tensor:
    """PEFT's own forward for this call; warns once per kind of ``reason``, whatever adapter it names (None:
    nothing to fuse, no warning)."""
    key = None if reason is None else _ADAPTER_NAME.sub("adapter", reason)
    if key is not None and not torch.compiler.is_compiling() and key not in _warned:
        _warned.add(key)
        warnings.warn(f"kfuse.integrations.peft: {reason}; PEFT's own forward runs such calls (this warning is "
                      "shown once)", stacklevel=4)
    return _lora.Linear.forward(self, x, *args, **kwargs)


def _call_reason(self: nn.Module, x: object, weight: Tensor, bias: Tensor | None) -> str | None:
    """Why this call of a fused layer cannot run kfuse (x, base layer's ``weight`` and ``bias`` as read for this
    call, global state), or None."""
    if not isinstance(x, Tensor):
        return f"the input is a {type(x).__name__}, not a tensor"
    base = self.base_layer
    if not _plain(weight) or (bias is not None and not _plain(bias)):
        return "the base weight or bias became a tensor subclass after fuse"
    if _routing.autocast_dtype(x) is not None:  # kfuse's ops cast as autocast does: x and W need not agree
        if _routing.autocast_dtype(weight) is None:
            return f"autocast is enabled and the base weight is {weight.dtype}, which autocast does not cast"
    elif x.dtype != weight.dtype or x.dtype not in _FLOATS:
        return f"the input's dtype ({x.dtype}) is not the base weight's ({weight.dtype})"
    if x.ndim == 0 or x.shape[-1] != self.in_features:
        return f"the input's last dimension is not in_features ({self.in_features})"
    if x.device != weight.device:
        return "the input is not on the base weight's device"
    if _has_hooks(base) or _global_hooks():
        return "the base layer has hooks (its own or global module hooks)"
    return None


def _adapter_reason(self: nn.Module, adapter: str, x: Tensor) -> str | None:
    """Why ``adapter`` of this layer cannot run on kfuse for input ``x``, or None."""
    if adapter in self.lora_variant:
        return f"adapter {adapter!r} uses {_variant_name(self, adapter)}"
    A, B, drop = self.lora_A[adapter], self.lora_B[adapter], self.lora_dropout[adapter]
    if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None:
        return f"adapter {adapter!r}: lora_A / lora_B are not the plain nn.Linear PEFT makes"
    if _has_hooks(A) or _has_hooks(B) or _has_hooks(drop):
        return f"adapter {adapter!r}: its lora_A / lora_B / dropout modules have hooks"
    if type(drop) is nn.Dropout:
        if drop.training and drop.p > 0 and (drop.inplace or drop.p >= 1):
            return f"adapter {adapter!r}: dropout with p >= 1 or inplace=True"
    elif type(drop) is not nn.Identity:
        return f"adapter {adapter!r}: its dropout is a {type(drop).__name__}, not nn.Dropout / nn.Identity"
    wa, wb = A.weight, B.weight
    lb = B.bias
    if not _plain(wa) or not _plain(wb) or (lb is not None and not _plain(lb)):
        return f"adapter {adapter!r}: its weights are tensor subclasses"
    if wa.dtype != wb.dtype or (lb is not None and lb.dtype != wa.dtype):
        return f"adapter {adapter!r}: lora_A and lora_B have different dtypes"
    cast = _routing.autocast_dtype(x)
    if cast is not None:  # kfuse keeps float32 adapters and casts half ones, as autocast's matmuls would
        if _routing.autocast_dtype(wa) is None:
            return f"adapter {adapter!r}: autocast is enabled and its dtype ({wa.dtype}) is one autocast does not cast"
    elif wa.dtype != x.dtype and wa.dtype != torch.float32:
        return f"adapter {adapter!r}: its dtype ({wa.dtype}) is neither float32 nor the input's ({x.dtype})"
    elif wa.dtype != x.dtype and not getattr(self, "cast_input_dtype_enabled", True):
        return (f"adapter {adapter!r}: input dtype casting is disabled (peft.helpers.disable_input_dtype_casting) and "
                f"its dtype ({wa.dtype}) is not the input's ({x.dtype})")
    if wa.device != x.device or wb.device != x.device:
        return f"adapter {adapter!r} is not on the input's device"
    s = self.scaling[adapter]
    if isinstance(s, bool) or not isinstance(s, numbers.Real):
        return f"adapter {adapter!r}: its scaling is a {type(s).__name__}, not a number"
    return None


def _dropout_p(self: nn.Module, adapter: str) -> float:
    """The dropout probability PEFT applies to ``adapter``'s branch now (0 in eval mode)."""
    drop = self.lora_dropout[adapter]
    return float(drop.p) if type(drop) is nn.Dropout and drop.training else 0.0


def _fused_forward(self: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    """The forward :func:`fuse` installs on a PEFT ``lora.Linear``: PEFT's semantics on kfuse's
    kernels, reading the layer's PEFT state on every call (module docstring)."""
    if args or any(k != "adapter_names" and (k not in _VARIANT_KWARGS or v is not None) for k, v in kwargs.items()):
        return _peft(self, "a LoRA layer was called with extra forward arguments", x, args, kwargs)
    self._check_forward_args(x, **kwargs)  # PEFT's own argument checks and errors
    if self.disable_adapters or self.merged:
        return _peft(self, None, x, args, kwargs)  # the base layer alone (PEFT unmerges a disabled merged layer)
    base = self.base_layer
    # Read once: a parametrized base weight is computed at each read (read twice, spectral_norm's power iteration
    # ran twice a call and its state drifted from PEFT's; module-conventions hunt, 2026-12-07).
    weight, bias = base.weight, base.bias
    reason = _call_reason(self, x, weight, bias)
    if reason is not None:
        return _peft(self, reason, x, args, kwargs)
    adapter_names = kwargs.get("adapter_names")
    if adapter_names is not None:
        return _mixed_batch(self, x, adapter_names, args, kwargs, weight, bias)
    active = [a for a in self.active_adapters if a in self.lora_A]
    if not active:
        return _peft(self, None, x, args, kwargs)
    for a in active:
        reason = _adapter_reason(self, a, x)
        if reason is not None:
            return _peft(self, reason, x, args, kwargs)
    fifo = isinstance(base, Conv1D)
    backend = getattr(self, "_kfuse_backend", "auto")
    if len(active) == 1:
        a = active[0]
        B = self.lora_B[a]
        p = _dropout_p(self, a)
        return kfuse.lora_linear(x, weight, self.lora_A[a].weight, B.weight, self.scaling[a], bias, B.bias,
                                 dropout_p=p, training=p > 0, fan_in_fan_out=fifo, backend=backend)
    if any(_dropout_p(self, a) > 0 for a in active):
        return _peft(self, "several active adapters with dropout in training (PEFT draws one mask per adapter)",
                     x, args, kwargs)
    # Several adapters: one adapter of rank Σr with the scalings folded into B. The concatenations
    # are differentiable, so each adapter's own parameters get their gradients.
    A = torch.cat([self.lora_A[a].weight for a in active], 0)
    B = torch.cat([self.lora_B[a].weight * self.scaling[a] for a in active], 1)
    lora_bias = None
    for a in active:
        lb = self.lora_B[a].bias
        if lb is not None:
            lb = lb * self.scaling[a]
            lora_bias = lb if lora_bias is None else lora_bias + lb
    if lora_bias is not None:  # adapters of mixed dtypes: the concatenation took the widest (float32)
        lora_bias = lora_bias.to(A.dtype)
    return kfuse.lora_linear(x, weight, A, B, 1.0, bias, lora_bias, fan_in_fan_out=fifo, backend=backend)


def _mixed_batch(self: nn.Module, x: Tensor, adapter_names: list[str], args: tuple, kwargs: dict, weight: Tensor,
                 bias: Tensor | None) -> Tensor:
    """PEFT's ``_mixed_batch_forward`` (sample ``i`` of ``x`` uses adapter ``adapter_names[i]``;
    ``"__base__"`` and adapters this layer lacks: the base layer) on ``kfuse.lora_linear_multi``; ``weight``,
    ``bias``: the base layer's, as read for this call."""
    if x.ndim < 2:
        return _peft(self, "adapter_names= with a 1-D input", x, args, kwargs)
    names = [n for n in dict.fromkeys(adapter_names) if n != "__base__" and n in self.lora_A]
    if not names:
        return _peft(self, None, x, args, kwargs)
    for a in names:
        reason = _adapter_reason(self, a, x)
        if reason is None and _dropout_p(self, a) > 0:
            reason = "adapter_names= (a mixed batch) with dropout active (training mode)"
        if reason is not None:
            return _peft(self, reason, x, args, kwargs)
    base = self.base_layer
    As = [self.lora_A[a].weight for a in names]
    Bs = [self.lora_B[a].weight for a in names]
    lbs = [self.lora_B[a].bias for a in names]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias, *As, *Bs, *lbs)):
        return _peft(self, "adapter_names= (a mixed batch) with inputs that require grad (kfuse.lora_linear_multi "
                     "is forward-only; serve under torch.no_grad())", x, args, kwargs)
    if len({t.dtype for t in As}) != 1:
        return _peft(self, "adapter_names= over adapters of different dtypes", x, args, kwargs)
    K, N = self.in_features, self.out_features
    ranks = [t.shape[0] for t in As]
    r_max = max(ranks)
    A_stack = As[0].new_zeros(len(names), r_max, K)
    B_stack = As[0].new_zeros(len(names), N, r_max)
    for i, (wa, wb) in enumerate(zip(As, Bs, strict=True)):
        A_stack[i, : ranks[i]] = wa
        B_stack[i, :, : ranks[i]] = wb
    slot = {a: i for i, a in enumerate(names)}
    ids = torch.tensor([slot.get(n, -1) for n in adapter_names], dtype=torch.int64, device=x.device)
    ids = ids.view(-1, *([1] * (x.ndim - 2))).expand(x.shape[:-1])
    # In the op's accumulation dtype: float64 for a float64 layer (float32 scalings lost 1e-7 there)
    scalings = torch.tensor([float(self.scaling[a]) for a in names], dtype=acc_dtype(x.dtype), device=x.device)
    y = kfuse.lora_linear_multi(x, weight, A_stack, B_stack, scalings,
                                torch.tensor(ranks, dtype=torch.int32, device=x.device), ids, bias,
                                fan_in_fan_out=isinstance(base, Conv1D),
                                backend=getattr(self, "_kfuse_backend", "auto"))
    if any(lb is not None for lb in lbs):  # lora_linear_multi has no lora_bias: add s_a·lora_bias_a per row
        rows = As[0].new_zeros(len(names) + 1, N)  # row 0: the base model's rows (id -1)
        for i, (a, lb) in enumerate(zip(names, lbs, strict=True)):
            if lb is not None:
                rows[i + 1] = lb * self.scaling[a]
        y = y + rows[ids + 1].to(y.dtype)
    return y


# ---------------------------------------------------------------- public API


def _tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"kfuse.integrations.peft: model must be a torch.nn.Module; got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def fuse(model: nn.Module, *, backend: str = "auto", warn: bool = True) -> Report:
    """Switches every PEFT LoRA ``Linear`` of ``model`` that kfuse can serve to kfuse's kernels, in place.

    Args:
        model: a ``PeftModel``, a ``LoraModel``, or any module holding PEFT LoRA layers.
        backend: passed to :func:`kfuse.lora_linear` / :func:`kfuse.lora_linear_multi` (``"auto"``:
            the fastest for the input's device and dtype).
        warn: whether to warn (once, listing them all) about the PEFT layers left to PEFT.
    Returns:
        a :class:`Report`: the layers fused (those fused before included) and those skipped,
        with the reason. Calling ``fuse`` again is harmless (it fuses layers added since).

    Each fused layer reads PEFT's state on every call (adapters, scaling, dropout, merge,
    disable, train/eval; see the module docstring) and runs PEFT's own forward for a call it
    cannot serve. :func:`unfuse` undoes this.
    """
    _backends.check_backend_name("integrations.peft.fuse", backend)  # (TypeError for a non-str, as the ops)
    report = Report()
    for name, module in _tuner_layers(model):
        if _is_fused(module):
            module._kfuse_backend = backend
            report.fused.append(name)
            continue
        reason = _skip_reason(module)
        if reason is not None:
            report.skipped[name] = reason
            continue
        module._kfuse_backend = backend
        module.__class__ = FusedLinear  # this layer only; unfuse sets lora.Linear back
        report.fused.append(name)
    if warn and (report.skipped or not report.fused):
        by_reason: dict[str, list[str]] = {}
        for name, why in report.skipped.items():
            # Without the adapters' names (the Report keeps them): a server fusing each user's DoRA adapter made
            # a new text, a new entry in the caller's __warningregistry__, per adapter (memory hunt, 2026-12-07).
            by_reason.setdefault(_ADAPTER_NAME.sub("an adapter", why), []).append(name)
        parts = [f"{why}: {', '.join(names)}" for why, names in by_reason.items()]
        head = (f"kfuse.integrations.peft.fuse: {len(report.skipped)} PEFT layer(s) left to PEFT "
                f"({len(report.fused)} fused)") if report.skipped else "kfuse.integrations.peft.fuse: no PEFT layer"
        warnings.warn(head + ("; " + "; ".join(parts) if parts else " found (nothing fused)"), stacklevel=2)
    return report


def unfuse(model: nn.Module) -> Report:
    """Switches every layer :func:`fuse` fused in ``model`` back to PEFT's ``lora.Linear``, exactly
    as before ``fuse``. Returns a :class:`Report` listing them in ``unfused``."""
    report = Report()
    for name, module in _tuner_layers(model):
        if _is_fused(module):
            fused_forward = FusedLinear.forward
            # A hook added after fuse (accelerate's add_hook_to_module) keeps the fused forward as a bound
            # method on the instance (its _old_forward, or forward itself), which ran kfuse after unfuse
            # while fused_layers said otherwise (bug hunt): rebind those to PEFT's forward. Before the class
            # changes: after it, an interrupt in between left the hook running kfuse on a layer that unfuse
            # no longer sees as fused (process hunt, 2026-12-07); this way a second unfuse completes it.
            for attr, value in list(module.__dict__.items()):
                if (isinstance(value, types.MethodType) and value.__self__ is module
                        and value.__func__ is fused_forward):
                    setattr(module, attr, types.MethodType(_lora.Linear.forward, module))
            module.__class__ = _unfused_class(type(module))
            module.__dict__.pop("_kfuse_backend", None)
            report.unfused.append(name)
    return report


def fused_layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s layers that :func:`fuse` switched to kfuse (and not unfused since)."""
    return [name for name, module in _tuner_layers(model) if _is_fused(module)]
