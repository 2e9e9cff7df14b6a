"""``kfuse.nn.LoRALinear`` and ``kfuse.nn.MultiLoRALinear``: LoRA-adapted linear layers.

``LoRALinear`` is a drop-in for PEFT's ``lora.Linear`` (one adapter, training and inference);
``MultiLoRALinear`` serves a batch whose rows use different adapters (forward only).
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from kfuse import _backends, _checks, _routing
from kfuse.nn._buffers import apply_keeping_dtype, pre_hooks_first
from kfuse.ops.lora import _check_tensor, _check_x_weight, lora_linear, lora_linear_multi
from kfuse.reference.lora import acc_dtype

# MultiLoRALinear's four adapter buffers are replaced together (add_adapter, a load that resizes them,
# reset_parameters) and read together by forward, under the module's lock: a server thread's forward read the
# new A_stack beside the old ranks while another thread hot-added an adapter, and failed (349 spurious errors in
# 300 adds; concurrency hunt, 2026-12-05). One lock per module (a load runs user hooks under it: one lock for
# all held up every other layer's forward meanwhile; review of the change), kept here rather than on the module,
# which must pickle and deep-copy. Re-entrant: a load restores its stacks through _set_stacks.
_STACK_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stacks_lock(module: nn.Module) -> threading.RLock:
    lock = _STACK_LOCKS.get(module)
    return _STACK_LOCKS.setdefault(module, threading.RLock()) if lock is None else lock


def _adapter_dtype(adapter_dtype: torch.dtype | None, base_dtype: torch.dtype, cls: str) -> torch.dtype:
    """PEFT keeps adapters in float32 (``autocast_adapter_dtype=True``) under fp16/bf16/fp32 bases.
    An explicit dtype must be one the op takes: float32 or the base's."""
    if adapter_dtype is None:
        return torch.float64 if base_dtype == torch.float64 else torch.float32
    if adapter_dtype not in (torch.float32, base_dtype):
        raise TypeError(f"{cls}: adapter_dtype must be torch.float32 or the base weight's dtype ({base_dtype}); "
                        f"got {adapter_dtype}")
    return adapter_dtype


def _new_base(cls: str, in_features: int, out_features: int, bias: bool, fan_in_fan_out: bool,
              device: torch.device | str | None, dtype: torch.dtype | None) -> tuple[int, int, nn.Parameter,
                                                                                   nn.Parameter | None]:
    """(in_features, out_features, weight, bias) of a new frozen base layer: weight ``[out, in]``
    (``[in, out]`` with ``fan_in_fan_out``), uninitialised."""
    _checks.check_bool(cls, "bias", bias)
    in_features = _checks.integer(cls, "in_features", in_features, 1)
    out_features = _checks.integer(cls, "out_features", out_features, 1)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        # (an integer dtype failed in the init: "check_uniform_bounds not implemented for 'Long'"; error hunt)
        raise TypeError(f"{cls}: dtype must be a floating dtype; got {dtype!r}")
    shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
    weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)
    b = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
    return in_features, out_features, weight, b


@torch.no_grad()
def _init_base(weight: Tensor, bias: Tensor | None, fan_in_fan_out: bool, in_features: int) -> None:
    """A base layer's weight and bias initialised as ``nn.Linear`` initialises its own."""
    nn.init.kaiming_uniform_(weight.t() if fan_in_fan_out else weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(bias, -bound, bound)


def _is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is GPT-2's ``Conv1D`` (``transformers.pytorch_utils``; not imported: transformers is
    no runtime dependency): weight ``[in, out]``, ``y = x W + b``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _base_parameters(linear: nn.Module, fan_in_fan_out: bool, freeze_base: bool,
                     cls: str) -> tuple[nn.Parameter, nn.Parameter | None, int, int, bool]:
    """(weight, bias, in_features, out_features, fan_in_fan_out) of an ``nn.Linear`` (``[out, in]``) or of a
    GPT-2 ``Conv1D`` (``[in, out]``). ``fan_in_fan_out`` follows the module, with a warning where the
    argument said otherwise, as PEFT does: a square Conv1D taken as ``[out, in]`` computed ``x Wᵀ``
    without an error (review 2026-12-04). ``freeze_base`` sets ``requires_grad=False`` on them, as PEFT
    does."""
    _checks.check_bool(f"{cls}.from_linear", "freeze_base", freeze_base)
    _checks.check_bool(f"{cls}.from_linear", "fan_in_fan_out", fan_in_fan_out)
    conv1d = _is_conv1d(linear)
    if not (conv1d or isinstance(linear, nn.Linear)):
        raise TypeError(f"{cls}.from_linear: linear must be an nn.Linear or a GPT-2 Conv1D; got "
                        f"{type(linear).__name__}")
    parametrized = [n for n in ("weight", "bias") if torch.nn.utils.parametrize.is_parametrized(linear, n)]
    if parametrized:
        # The layer keeps the tensors it is given; a parametrized one is recomputed from its originals at
        # every access, so the layer held a stale snapshot outside its state_dict, or (freeze_base) raised
        # autograd's error for a non-leaf (module hunt, 2026-12-05). PEFT wraps the live module instead.
        raise ValueError(f"{cls}.from_linear: linear.{parametrized[0]} is parametrized "
                         "(torch.nn.utils.parametrize: weight_norm, spectral_norm, orthogonal, ...), which "
                         f"{cls} cannot hold; remove it first (parametrize.remove_parametrizations(linear, "
                         f"'{parametrized[0]}')), or wrap the model with PEFT and kfuse.integrations.peft.fuse")
    weight = linear.weight
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise TypeError(f"{cls}.from_linear: linear.weight must be a 2-D tensor; got "
                        f"{type(weight).__name__ if not isinstance(weight, Tensor) else tuple(weight.shape)}")
    for name in ("weight", "bias"):  # torch.nn.utils.weight_norm (hooks) recomputes them from other tensors
        if getattr(getattr(linear, name, None), "grad_fn", None) is not None:
            raise ValueError(f"{cls}.from_linear: linear.{name} is computed from other tensors (a non-leaf, as "
                             f"torch.nn.utils.weight_norm makes it), which {cls} cannot hold; remove that first")
    if fan_in_fan_out != conv1d:
        kind = "a Conv1D (weight [in, out])" if conv1d else "an nn.Linear (weight [out, in])"
        warnings.warn(f"{cls}.from_linear: fan_in_fan_out={fan_in_fan_out} but linear is {kind}; using "
                      f"fan_in_fan_out={conv1d}", stacklevel=3)
        fan_in_fan_out = conv1d
    in_f, out_f = weight.shape if fan_in_fan_out else weight.shape[::-1]
    bias = getattr(linear, "bias", None)
    if freeze_base:
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
    return weight, bias, in_f, out_f, fan_in_fan_out


def _foreign_flag(buf: Tensor, own: bool) -> bool:
    """The value of a ``lora_merged`` buffer that is not the module's own (see :attr:`LoRALinear.merged`), read
    once per version and storage of it (``buf.data = t`` keeps the version: the old value was used, and the
    adapter counted twice; module-conventions hunt, 2026-12-07); ``own`` (the module's state) where it has no
    value to read."""
    if not _routing.plain(buf) or buf.device.type == "meta" or _routing.functorch_wrapped((buf,)):
        return own
    version = _routing.version(buf)
    if version is None:  # an inference tensor has no version to tell a write by: read every time (inference hunt)
        return bool(buf)
    key = (version, buf.data_ptr())
    known = getattr(buf, "_kfuse_merged", None)
    if known is None or known[1] != key:
        known = buf._kfuse_merged = (bool(buf), key)
    return known[0]


class LoRALinear(nn.Module):
    """A linear layer with a LoRA adapter: ``y = x Wᵀ + bias + scaling · ((dropout(x) Aᵀ) Bᵀ + lora_bias)``
    (:func:`kfuse.lora_linear`), numerically PEFT's ``lora.Linear``.

    Args:
        in_features: K. out_features: N.
        r: the adapter's rank (>= 1).
        lora_alpha: ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` when ``use_rslora``).
        lora_dropout: dropout probability of the LoRA branch in training, in ``[0, 1)``.
        use_rslora: rank-stabilised scaling.
        bias: whether the base layer has a bias.
        fan_in_fan_out: the base weight is stored ``[K, N]`` (GPT-2's Conv1D).
        lora_bias: whether the adapter has a bias (PEFT's ``lora_bias=True``: ``lora_B.bias``).
        backend: passed to :func:`kfuse.lora_linear`.
        device, dtype: of the base layer.
        adapter_dtype: of the adapters; float32 by default (float64 for a float64 base), as
            PEFT upcasts them.
    Parameters:
        weight: ``[N, K]`` (``[K, N]`` with ``fan_in_fan_out``), ``dtype``; frozen
            (``requires_grad=False``), initialised as ``nn.Linear``'s.
        bias: ``[N]``, ``dtype``, frozen, or None.
        lora_A: ``[r, K]``, kaiming-uniform (``a = √5``); lora_B: ``[N, r]``, zeros (so a new
            layer computes its base layer's output); lora_bias: ``[N]`` zeros or None. All in
            ``adapter_dtype``, trainable.
    Shape:
        input ``[..., K]`` in ``dtype``; output ``[..., N]`` in ``dtype``.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8.0,
                 lora_dropout: float = 0.0, use_rslora: bool = False, bias: bool = True, fan_in_fan_out: bool = False,
                 lora_bias: bool = False, backend: str = "auto", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        in_features, out_features, weight, b = _new_base(
            "LoRALinear", in_features, out_features, bias, fan_in_fan_out, device, dtype)
        self._setup(weight, b, in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, fan_in_fan_out,
                    lora_bias, backend, adapter_dtype)
        self.reset_parameters()

    def _setup(self, weight: nn.Parameter, bias: nn.Parameter | None, in_features: int, out_features: int, r: int,
               lora_alpha: float, lora_dropout: float, use_rslora: bool, fan_in_fan_out: bool, lora_bias: bool,
               backend: str, adapter_dtype: torch.dtype | None) -> None:
        cls = type(self).__name__
        r = _checks.integer(cls, "r", r, 1)
        lora_alpha = _checks.real(cls, "lora_alpha", lora_alpha)
        lora_dropout = _checks.real(cls, "lora_dropout", lora_dropout)
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"{cls}: lora_dropout must be in [0, 1); got {lora_dropout}")
        for name, v in (("use_rslora", use_rslora), ("fan_in_fan_out", fan_in_fan_out), ("lora_bias", lora_bias)):
            _checks.check_bool(cls, name, v)
        _backends.check_backend_name(cls, backend)  # (TypeError for a non-str, as the ops)
        self.backend = backend
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_alpha, self.lora_dropout, self.use_rslora = lora_alpha, lora_dropout, use_rslora
        self.fan_in_fan_out = fan_in_fan_out
        self.scaling = self.lora_alpha / (math.sqrt(r) if use_rslora else r)
        # Never an inference tensor (a layer built under torch.inference_mode: merge() outside it could not write
        # the flag; inference hunt, 2026-12-07).
        with torch.inference_mode(False):
            self.register_buffer("lora_merged", torch.zeros((), dtype=torch.bool, device=weight.device))
        self._remember_merged(False)  # see merged
        self.weight = weight
        self.bias = bias
        a_dtype = _adapter_dtype(adapter_dtype, weight.dtype, type(self).__name__)
        factory = {"device": weight.device, "dtype": a_dtype}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.lora_bias = nn.Parameter(torch.empty(out_features, **factory)) if lora_bias else None
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                    use_rslora: bool = False, fan_in_fan_out: bool = False, lora_bias: bool = False,
                    freeze_base: bool = True, backend: str = "auto",
                    adapter_dtype: torch.dtype | None = None) -> LoRALinear:
        """A LoRA layer over ``linear``'s weight and bias, shared (the same Parameters, not
        copies: merging writes into them). ``linear`` is an ``nn.Linear``, or GPT-2's Conv1D (weight
        ``[in, out]``): ``fan_in_fan_out`` follows the module (True for a Conv1D), with a warning where
        it said otherwise, as PEFT does. ``freeze_base`` sets ``requires_grad=False`` on them, as PEFT
        does."""
        weight, bias, in_f, out_f, fan_in_fan_out = _base_parameters(linear, fan_in_fan_out, freeze_base,
                                                                     cls.__name__)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(weight, bias, in_f, out_f, r, lora_alpha, lora_dropout, use_rslora, fan_in_fan_out, lora_bias,
                    backend, adapter_dtype)
        return self

    @property
    def merged(self) -> bool:
        """Whether W holds the adapter (:meth:`merge`). Saved as the 0-d bool buffer ``lora_merged``, updated
        in place, so a state_dict taken before a merge or unmerge says what its W (an alias of the live
        one, as torch's state_dicts are) holds: with a snapshot, a state_dict taken before merge() counted
        the adapter twice once loaded (state bug hunt). A tensor, not extra state: a dict in the
        state_dict broke safetensors, ``torch.func.functional_call`` and code that clones or moves every
        entry (review 2026-12-04).

        With its own buffer the forward reads a Python copy that merge(), unmerge() and loads keep: no device
        read (DDP writes the buffer in place at every step), a constant for ``torch.compile``. Another buffer
        (``torch.func.functional_call`` passes its own) is read, once per version of it (the value is kept on
        the tensor): the module's own state ran there, the other branch silently when the states differ (copy
        hunt). A buffer with no value to read (meta, fake, ``torch.vmap``-batched) takes the module's state.
        Not seen: writes into the module's own buffer other than through merge(), unmerge() and loads
        (a shallow copy's merge() is one)."""
        buf = self.lora_merged
        if buf is self.__dict__.get("_own_flag"):
            return self._merged
        if torch.compiler.is_compiling():  # no value while tracing: the forward picks by the buffer in the graph
            return self._merged
        return _foreign_flag(buf, self._merged)

    @merged.setter
    def merged(self, value: bool) -> None:
        self._own_flag = None  # until both are written (see _write_merge)
        self.lora_merged.fill_(bool(value))
        self._remember_merged(bool(value))

    def _remember_merged(self, value: bool) -> None:
        """The Python copy of ``lora_merged`` (see :attr:`merged`) and which buffer it is of."""
        self._merged = value
        self._own_flag = self.lora_merged

    def _apply(self, fn, recurse: bool = True):
        before, merged = self.lora_merged, self.merged
        super()._apply(fn, recurse)
        buf = self.lora_merged
        if buf is not before and buf.device.type != "meta" and _routing.plain(buf):
            # A moved or cast buffer keeps its value, but to_empty()'s has none: a layer built on meta and
            # initialised by the user's function saved a random lora_merged, and reloaded as merged
            # (module hunt, 2026-12-05). The layer's state is written into the new buffer.
            with torch.no_grad():
                buf.fill_(merged)
        self._remember_merged(merged)
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Base layer as ``nn.Linear`` initialises it, and the adapter as PEFT does; the layer is then
        unmerged (W holds no adapter)."""
        _init_base(self.weight, self.bias, self.fan_in_fan_out, self.in_features)
        self.merged = False  # it stayed True on a merged layer: the adapter was then ignored (state bug hunt)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's initialisation: ``lora_A`` kaiming-uniform (``a = √5``), ``lora_B`` and ``lora_bias`` zeros.
        A merged layer is unmerged first, so that W is the base weight again (unmerging afterwards took out
        the new, zero adapter and left the old one in W)."""
        if self.merged:
            self.unmerge()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.lora_bias is not None:
            nn.init.zeros_(self.lora_bias)

    def _updated_weight(self, sign: float) -> Tensor:
        """``W ± scaling · B A`` (transposed for ``fan_in_fan_out``), accumulated in float32
        (float64 for a float64 W), in W's dtype."""
        acc = acc_dtype(self.weight.dtype)
        delta = (self.lora_B.detach().to(acc) @ self.lora_A.detach().to(acc)) * self.scaling  # [N, K]
        if self.fan_in_fan_out:
            delta = delta.t()
        return (self.weight.detach().to(acc) + sign * delta).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the adapter into the base weight in place: ``W ← W + scaling · B A`` (fp32
        accumulation); the forward then is the base layer's (plus ``scaling · lora_bias``).
        For fp16/bf16 weights a merge/unmerge round trip rounds W twice."""
        if self.merged:
            warnings.warn("LoRALinear.merge: already merged; nothing to do", stacklevel=2)
            return
        self._check_weight_is_held("merge")
        self._write_merge(1.0)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undoes :meth:`merge`: ``W ← W − scaling · B A`` (fp32 accumulation)."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge: not merged; nothing to do", stacklevel=2)
            return
        self._check_weight_is_held("unmerge")
        self._write_merge(-1.0)

    def _write_merge(self, sign: float) -> None:
        """W and the merged flag written in one call (a foreach copy): written in two, an interrupt raised as
        the first returned left W merged and the flag not (the adapter then counted twice; process hunt,
        2026-12-07). Until both are written the Python copy of the flag is not the buffer's (:attr:`merged` then
        reads the buffer itself)."""
        new_w, value = self._updated_weight(sign), sign > 0
        flag = self.lora_merged
        self._own_flag = None
        torch._foreach_copy_([self.weight, flag], [new_w, torch.full_like(flag, value)])
        self._remember_merged(value)

    def _check_weight_is_held(self, what: str) -> None:
        """A merge must write W and the flag together. Outside torch.inference_mode an inference tensor refuses
        a write only after making it: W merged and the flag not (one made under inference_mode) left the layer
        adding the adapter twice, silently (inference hunt, 2026-12-07). So both are checked before either write.

        A merge writes into the weight Parameter. A weight recomputed from other tensors at each access
        (torch.nn.utils.parametrize) or by a forward pre-hook (torch.nn.utils.prune) took the write in a
        temporary: merged was set, and the forward dropped the adapter (conversions hunt, 2026-12-05)."""
        pruned_or_normed = {"weight_orig", "weight_g"} & self._parameters.keys()  # prune's, weight_norm's originals
        if torch.nn.utils.parametrize.is_parametrized(self, "weight") or pruned_or_normed:
            raise RuntimeError(f"LoRALinear.{what}: weight is computed from other tensors (torch.nn.utils.parametrize "
                               "or prune), so a merge written into it would be lost; remove that first "
                               "(parametrize.remove_parametrizations / prune.remove), or keep the adapter unmerged")
        if not torch.is_inference_mode_enabled():
            for name in ("weight", "lora_merged"):
                if getattr(self, name).is_inference():
                    raise RuntimeError(f"LoRALinear.{what}: {name} is an inference tensor (made under "
                                       "torch.inference_mode()), which cannot be written outside it: call "
                                       f"{what}() under torch.inference_mode(), or load a normal tensor into it")

    @pre_hooks_first
    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # A W without the flag (a PEFT-style dict) is the base weight; a checkpoint of kfuse before
        # 2026-12-04 kept the flag as extra state, {"merged": bool}.
        key, old = prefix + "lora_merged", state_dict.pop(prefix + "_extra_state", None)
        if old is not None and not (isinstance(old, dict) and isinstance(old.get("merged"), bool)):
            raise ValueError(f"LoRALinear: the state_dict's {prefix}_extra_state (an earlier kfuse's merged flag) "
                             f"must be {{'merged': bool}}; got {old!r}")
        if key not in state_dict and (old is not None or prefix + "weight" in state_dict):
            with torch.inference_mode(False):  # (an assign=True load puts it in the module: see __init__)
                state_dict[key] = torch.tensor(old["merged"] if old is not None else False)
        self._own_flag = None  # the Python copy is not the buffer's until re-read (an interrupted load: see merged)
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._remember_merged(bool(self.lora_merged))

    def forward(self, x: Tensor) -> Tensor:
        """:func:`kfuse.lora_linear` with this layer's parameters (dropout in training mode only);
        when merged, the base layer (plus ``scaling · lora_bias``)."""
        buf = self._buffers["lora_merged"]  # (read once, from the dict: this runs on every call)
        if buf is self.__dict__.get("_own_flag"):
            return self._merged_forward(x) if self._merged else self._lora_forward(x)
        if torch.compiler.is_compiling() or _routing.functorch_wrapped((buf,)):
            # A buffer not the module's own (torch.func.functional_call's) whose value is unknown (while tracing)
            # or one per member (stacked for torch.func.vmap: an ensemble): both branches run and the buffer
            # picks, per member. The module's own state ran, and a compiled call with a merged layer's state
            # counted the adapter twice, silently (combination hunt), as did merged members of a vmapped
            # ensemble (function-transforms hunt, 2026-12-07).
            return torch.where(buf, self._merged_forward(x), self._lora_forward(x))
        return self._merged_forward(x) if self.merged else self._lora_forward(x)

    def _merged_forward(self, x: Tensor) -> Tensor:
        """The base layer (plus ``scaling · lora_bias``): W holds the adapter."""
        # the unmerged op's checks, where F.linear raised bare shape and dtype errors
        _check_tensor("LoRALinear", "x", x)
        _check_x_weight("LoRALinear", x, self.weight, self.fan_in_fan_out)
        y = nn.functional.linear(x, self.weight.t() if self.fan_in_fan_out else self.weight, self.bias)
        if self.lora_bias is not None:
            y = y + (self.scaling * self.lora_bias).to(y.dtype)
        return y

    def _lora_forward(self, x: Tensor) -> Tensor:
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scaling, self.bias, self.lora_bias,
                           self.lora_dropout, self.training, self.fan_in_fan_out, self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, scaling={self.scaling:g}, "
                f"bias={self.bias is not None}, fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}, "
                f"backend={self.backend!r}")


class MultiLoRALinear(nn.Module):
    """A linear layer serving several LoRA adapters at once (forward only,
    :func:`kfuse.lora_linear_multi`): each row of the input uses the adapter its id names, or
    none (id ``-1``).

    Adapters of any rank are added with :meth:`add_adapter` (and one put in another's place, keeping its id,
    with :meth:`replace_adapter`); they are stored padded to the
    largest rank (``r_max``) in the buffers ``A_stack [L, r_max, K]``, ``B_stack [L, N, r_max]``,
    ``scalings [L]`` (float32; float64 for a float64 layer) and ``ranks [L]`` (int32). Padding is never
    read.

    Args:
        in_features: K. out_features: N.
        bias: whether the base layer has a bias. fan_in_fan_out: base weight stored ``[K, N]``.
        backend: passed to :func:`kfuse.lora_linear_multi`.
        device, dtype: of the base layer. adapter_dtype: of the stacks (float32 by default;
        float64 for a float64 layer).
    Parameters:
        weight ``[N, K]`` (``[K, N]``), bias ``[N]`` or None: frozen, initialised as ``nn.Linear``'s.
    Shape:
        ``forward(x [..., K], adapter_ids)`` → ``[..., N]``; ``adapter_ids`` int, one per row
        (``x.shape[:-1]`` or ``[M]``), or one per leading index (``[x.shape[0]]``, e.g. one per
        sequence of ``[B, T, K]``).
    Serve under ``torch.no_grad()`` / ``torch.inference_mode()`` if the base weight is trainable
    (otherwise the differentiable reference runs).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fan_in_fan_out: bool = False,
                 backend: str = "auto", device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        in_features, out_features, weight, b = _new_base(
            "MultiLoRALinear", in_features, out_features, bias, fan_in_fan_out, device, dtype)
        self._setup(weight, b, in_features, out_features, fan_in_fan_out, backend, adapter_dtype)
        self.reset_parameters()

    def _setup(self, weight: nn.Parameter, bias: nn.Parameter | None, in_features: int, out_features: int,
               fan_in_fan_out: bool, backend: str, adapter_dtype: torch.dtype | None) -> None:
        _checks.check_bool("MultiLoRALinear", "fan_in_fan_out", fan_in_fan_out)
        _backends.check_backend_name("MultiLoRALinear", backend)
        self.backend = backend
        self.in_features, self.out_features, self.fan_in_fan_out = in_features, out_features, fan_in_fan_out
        self.weight, self.bias = weight, bias
        a_dtype = _adapter_dtype(adapter_dtype, weight.dtype, "MultiLoRALinear")
        for name in ("A_stack", "B_stack", "scalings", "ranks"):
            self.register_buffer(name, None)
        self._no_adapters(a_dtype)

    @torch.inference_mode(False)  # the stacks replace the buffers: see _put_adapter
    def _no_adapters(self, adapter_dtype: torch.dtype) -> None:
        """Empty stacks (no adapter) in ``adapter_dtype``, on the base weight's device."""
        dev, K, N = self.weight.device, self.in_features, self.out_features
        self._set_stacks(("A_stack", "B_stack", "scalings", "ranks"),
                         [torch.zeros(0, 0, K, device=dev, dtype=adapter_dtype),
                          torch.zeros(0, N, 0, device=dev, dtype=adapter_dtype),
                          torch.zeros(0, device=dev, dtype=acc_dtype(self.weight.dtype)),
                          torch.zeros(0, device=dev, dtype=torch.int32)])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The base layer initialised as ``nn.Linear`` initialises it, and no adapters (the stacks emptied:
        after ``to_empty()`` they hold garbage). A generic re-initialisation (``if hasattr(m,
        "reset_parameters")``) left the base weight uninitialised here (copy hunt)."""
        _init_base(self.weight, self.bias, self.fan_in_fan_out, self.in_features)
        self._no_adapters(self.A_stack.dtype)

    def _apply(self, fn, recurse: bool = True):
        # scalings stay in the accumulation dtype of the base weight through .half() / .to(dtype): float32,
        # where the cast would round every adapter's scaling to the module's dtype (bf16: 0.2% of the LoRA
        # term); float64 for a float64 layer (float32 lost ~1e-7 there; review 2026-12-04).
        apply_keeping_dtype(self, lambda: super(MultiLoRALinear, self)._apply(fn, recurse), ["scalings"],
                            lambda: acc_dtype(self.weight.dtype))
        return self

    @classmethod
    def from_linear(cls, linear: nn.Module, fan_in_fan_out: bool = False, freeze_base: bool = True,
                    backend: str = "auto", adapter_dtype: torch.dtype | None = None) -> MultiLoRALinear:
        """A multi-adapter layer over ``linear``'s weight and bias, shared (not copied);
        ``freeze_base`` sets ``requires_grad=False`` on them."""
        weight, bias, in_f, out_f, fan_in_fan_out = _base_parameters(linear, fan_in_fan_out, freeze_base,
                                                                     cls.__name__)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(weight, bias, in_f, out_f, fan_in_fan_out, backend, adapter_dtype)
        return self

    @property
    def num_adapters(self) -> int:
        """L, the number of adapters added."""
        return self.A_stack.shape[0]

    @property
    def r_max(self) -> int:
        """The largest rank added (the stacks' padded rank)."""
        return self.A_stack.shape[1]

    def add_adapter(self, lora_A: Tensor, lora_B: Tensor, scaling: float) -> int:
        """Adds an adapter (``lora_A [r, K]``, ``lora_B [N, r]``, any r >= 1; copied, in the
        stacks' dtype) with its ``scaling``; returns its id (``0, 1, ...`` in order of addition).
        A rank above ``r_max`` re-pads the stacks."""
        return self._put_adapter(None, lora_A, lora_B, scaling, "add_adapter")

    def replace_adapter(self, adapter_id: int, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        """Puts a new adapter (as :meth:`add_adapter` takes it, any rank) in place of adapter ``adapter_id``
        (``0 <= adapter_id < num_adapters``), which keeps its id: a server reuses the slot of an adapter it
        evicts instead of growing the stacks. Like :meth:`add_adapter` it makes new stacks (a forward on
        another thread reads the old set or the new one, whole; a CUDA graph captured before reads the old)."""
        i = _checks.int_or_none(adapter_id)
        if i is None:
            raise TypeError(f"MultiLoRALinear.replace_adapter: adapter_id must be an int; got "
                            f"{_checks.type_name(adapter_id)}")
        if not 0 <= i < self.num_adapters:
            raise IndexError(f"MultiLoRALinear.replace_adapter: adapter_id {i} is out of range: the layer holds "
                             f"{self.num_adapters} adapters")
        self._put_adapter(i, lora_A, lora_B, scaling, "replace_adapter")

    # Not under inference mode: the stacks it builds replace the buffers, which must stay normal tensors
    # (inference tensors refuse in-place writes and saving for backward outside it: a load_state_dict,
    # an edit of scalings or a backward through x all failed after an add under inference mode; bug hunt).
    # Nor under grad mode: trainable adapters gave the stacks a history (deepcopy then failed).
    @torch.inference_mode(False)
    @torch.no_grad()
    def _put_adapter(self, slot: int | None, lora_A: Tensor, lora_B: Tensor, scaling: float, what: str) -> int:
        """The adapter written at ``slot`` of new stacks (appended when None), which then replace the old ones;
        returns its id."""
        where = f"MultiLoRALinear.{what}"
        if not isinstance(lora_A, Tensor) or not isinstance(lora_B, Tensor):
            raise TypeError(f"{where}: lora_A and lora_B must be tensors")
        for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):  # (a complex one lost its imaginary part)
            if not t.is_floating_point():
                raise TypeError(f"{where}: {name} must be a floating-point tensor; got {t.dtype}")
        K, N = self.in_features, self.out_features
        if lora_A.ndim != 2 or lora_A.shape[1] != K or lora_A.shape[0] < 1:
            raise ValueError(f"{where}: lora_A must have shape [r, K] = [r, {K}] with r >= 1; got "
                             f"{list(lora_A.shape)}")
        r = lora_A.shape[0]
        if tuple(lora_B.shape) != (N, r):
            raise ValueError(f"{where}: lora_B must have shape [N, r] = [{N}, {r}]; got {list(lora_B.shape)}")
        scaling = _checks.real(where, "scaling", scaling)
        names = ("A_stack", "B_stack", "scalings", "ranks")
        lock = _stacks_lock(self)
        while True:
            # Built from one set of stacks outside the lock, and set only if that set is still the module's:
            # two threads adding at once built from the same stacks, and the later replaced the earlier's
            # adapter, both returning one id (serving hunt, 2026-12-05). Building under the lock held up the
            # layer's forwards on other threads for the whole copy: bench/lora_add_stall.py (an add ~5 ms) gave
            # the forwards' max 5.6-19 ms, 2.3-3.4 ms built outside it (median 0.55 ms; 4 runs each, 2 cores).
            with lock:  # (the versions: a load of same-shaped stacks copies into them in place)
                old = [getattr(self, n) for n in names]
                versions = [_routing.version(t) for t in old]
            A_old, B_old, s_old, r_old_t = old
            L, r_old = A_old.shape[0], A_old.shape[1]
            if slot is not None and slot >= L:  # (a load on another thread left fewer adapters)
                raise IndexError(f"{where}: adapter_id {slot} is out of range: the layer holds {L} adapters")
            r_max, i = max(r_old, r), L if slot is None else slot
            count = L + 1 if slot is None else L
            A, B = A_old.new_zeros(count, r_max, K), B_old.new_zeros(count, N, r_max)
            A[:L, :r_old], B[:L, :, :r_old] = A_old, B_old
            scalings = torch.cat([s_old, s_old.new_tensor([scaling])]) if slot is None else s_old.clone()
            ranks = torch.cat([r_old_t, r_old_t.new_tensor([r])]) if slot is None else r_old_t.clone()
            if slot is not None:  # the replaced adapter's padding past r is never read, but not kept either
                A[i].zero_()
                B[i].zero_()
            A[i, :r], B[i, :, :r] = lora_A.to(A), lora_B.to(B)
            scalings[i], ranks[i] = scaling, r
            # All four built before any is set: a failure above (out of memory) left grown stacks beside
            # the old scalings, and every later forward refused them (exceptions hunt).
            with lock:
                now = [getattr(self, n) for n in names]
                if all(a is b for a, b in zip(now, old, strict=True)) and list(map(_routing.version, now)) == versions:
                    self._set_stacks(names, [A, B, scalings, ranks])
                    return i

    @torch.inference_mode(False)  # stacks made here replace the buffers: see _put_adapter
    @pre_hooks_first
    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        # The stacks' shapes grow with the adapters: take the saved ones (a fresh module has none), if
        # the saved stacks (with the module's own where a key is absent) are a consistent set for this
        # layer's K and N. Otherwise torch's load would still copy those whose shape happens to fit
        # (ranks [L] of another layer's stacks): keep all four as they were and say why.
        names = ("A_stack", "B_stack", "scalings", "ranks")
        if any(prefix + n in state_dict for n in names):
            with _stacks_lock(self):  # a forward meanwhile reads the stacks before or after, not resized ones
                self._load_stacks(names, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _load_stacks(self, names: tuple[str, ...], state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                     missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        """The stacks' part of _load_from_state_dict (under the module's _stacks_lock)."""
        new = [state_dict.get(prefix + n, getattr(self, n)) for n in names]
        # Copies: torch's load copies in place into the stacks whose shape does not change.
        kept = [getattr(self, n).clone() for n in names]
        if self._fits(*new):
            resized = {name: getattr(self, name).new_empty(t.shape) for name, t in zip(names, new, strict=True)
                       if t.shape != getattr(self, name).shape}
            errors = len(error_msgs)
            try:
                # Installed inside the try, at once: resized one by one before it, an interrupt left stacks of
                # uninitialised memory (garbage ranks and scalings, read silently; process hunt, 2026-12-07).
                self._set_stacks(tuple(resized), list(resized.values()))
                super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                              unexpected_keys, error_msgs)
            except BaseException:
                self._set_stacks(names, kept)
                raise
            if len(error_msgs) > errors:
                # A copy failed (torch records it and raises after the whole load): the stacks resized
                # for it held uninitialised memory, and the next forward read garbage ranks
                # (state-after-errors hunt, 2026-12-05). The layer keeps its adapters.
                self._set_stacks(names, kept)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._set_stacks(names, kept)
        shapes = ", ".join(f"{n} {list(t.shape) if isinstance(t, Tensor) else type(t).__name__}"
                           for n, t in zip(names, new, strict=True))
        error_msgs.append(f"MultiLoRALinear: the adapter stacks ({shapes}) are not a consistent set for "
                          f"this layer: A_stack [L, r, K={self.in_features}], B_stack [L, "
                          f"N={self.out_features}, r], scalings [L], ranks [L]; none of them was loaded")

    def _set_stacks(self, names: tuple[str, ...], stacks: list[Tensor]) -> None:
        """The stacks ``names`` (registered buffers) replaced by ``stacks``, together: one dict update (an
        interrupt between four setattr calls left stacks of different adapter counts, and the layer refused every
        later call; process hunt, 2026-12-07). Buffer-registration hooks are not run for the replacement."""
        with _stacks_lock(self):
            self._buffers.update(zip(names, stacks, strict=True))

    def _fits(self, A: object, B: object, scalings: object, ranks: object) -> bool:
        if not all(isinstance(t, Tensor) for t in (A, B, scalings, ranks)) or A.ndim != 3:
            return False
        L, r = A.shape[0], A.shape[1]
        return (tuple(A.shape) == (L, r, self.in_features) and tuple(B.shape) == (L, self.out_features, r)
                and tuple(scalings.shape) == (L,) and tuple(ranks.shape) == (L,))

    def forward(self, x: Tensor, adapter_ids: Tensor) -> Tensor:
        """``y [..., N]`` for ``x [..., K]``; row ``m`` uses adapter ``adapter_ids[m]`` (-1: none)."""
        if torch.compiler.is_compiling():  # (Dynamo traces no lock; a graph's stacks are its own anyway)
            stacks = (self.A_stack, self.B_stack, self.scalings, self.ranks)
        else:
            with _stacks_lock(self):  # the four of one set (see _stacks_lock)
                stacks = (self.A_stack, self.B_stack, self.scalings, self.ranks)
        return lora_linear_multi(x, self.weight, *stacks, adapter_ids, self.bias, self.fan_in_fan_out, self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.num_adapters}, "
                f"r_max={self.r_max}, bias={self.bias is not None}, fan_in_fan_out={self.fan_in_fan_out}, "
                f"backend={self.backend!r}")
