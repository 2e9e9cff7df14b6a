"""Embedding-bag modules on kfuse's kernels: a drop-in for ``torch.nn.EmbeddingBag`` and a
multi-table bag in the FBGEMM/TorchRec layout, optionally with a fused sparse optimizer."""

from __future__ import annotations

import bisect
import copy
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from kfuse import _backends, _checks, _routing
from kfuse.nn._buffers import apply_keeping_dtype, pre_hooks_first
from kfuse.ops import embedding as E
from kfuse.reference.embedding import (
    acc_dtype,
    adam_update,
    rounding_bits,
    rowwise_adagrad_update,
    sgd_update,
    stochastic_round,
)

if TYPE_CHECKING:  # torchrec is optional: its batches are recognised by name
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["EmbeddingBag", "MultiTableEmbeddingBag", "OPTIMIZERS"]

#: The fused optimizers of :class:`MultiTableEmbeddingBag` (``optimizer=``).
OPTIMIZERS = ("sgd", "rowwise_adagrad", "adam")


class EmbeddingBag(nn.EmbeddingBag):
    """``torch.nn.EmbeddingBag`` (``sum``/``mean``) computed by :func:`kfuse.embedding_bag`.

    A subclass of torch's module (whose constructor it does not run), so that what treats torch's module
    specially treats it alike: ``DistributedDataParallel`` takes sparse gradients only from torch's
    ``Embedding`` and ``EmbeddingBag`` modules, and failed on this one's (``sparse=True``: "Cannot access
    storage of SparseTensorImpl"; distributed hunt, 2026-12-05).

    Args: ``num_embeddings``, ``embedding_dim``, ``mode`` (``"mean"`` by default, as torch),
    ``padding_idx``, ``include_last_offset``, ``sparse``, ``_weight``, ``device``, ``dtype`` as torch's,
    by keyword (kfuse's positional order puts ``mode`` third); ``max_norm``, ``norm_type`` and
    ``scale_grad_by_freq`` at their defaults only, and no ``mode="max"``; ``backend`` and ``check``
    (keyword-only: ``"sync"`` or ``"async"``, :data:`kfuse.ops.embedding.CHECKS`) for the op.
    :meth:`from_pretrained` as torch's, :meth:`from_torch` to share a torch module's weight.
    The parameter is ``weight [num_embeddings, embedding_dim]`` (initialised ``N(0, 1)``, the padding
    row zero), so ``state_dict`` is interchangeable with torch's module. ``forward(input, offsets=None,
    per_sample_weights=None)`` → ``[B, embedding_dim]``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str = "mean", padding_idx: int | None = None,
                 include_last_offset: bool = False, sparse: bool = False, _weight: Tensor | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 backend: str = "auto", *, check: str = "sync", max_norm: float | None = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False) -> None:
        nn.Module.__init__(self)  # (torch's constructor would build its own weight; these attributes are its)
        E.check_torch_only("nn.EmbeddingBag", max_norm, norm_type, scale_grad_by_freq, mode)
        E.check_mode("nn.EmbeddingBag", check)
        _backends.check_backend_name("nn.EmbeddingBag", backend)  # here, not at the first forward
        self.max_norm, self.norm_type, self.scale_grad_by_freq = max_norm, norm_type, scale_grad_by_freq
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean' (kfuse has no 'max'); got {mode!r}")
        _checks.check_bool("nn.EmbeddingBag", "include_last_offset", include_last_offset)
        _checks.check_bool("nn.EmbeddingBag", "sparse", sparse)
        # (unchecked, -1 rows blamed padding_idx, 10.0 failed in torch.empty and True made a [10, 1] table:
        # error-message hunt)
        num_embeddings = _checks.integer("nn.EmbeddingBag", "num_embeddings", num_embeddings, 0)  # (0: as torch)
        embedding_dim = _checks.integer("nn.EmbeddingBag", "embedding_dim", embedding_dim, 1)
        if padding_idx is not None:
            padding_idx = _checks.integer("nn.EmbeddingBag", "padding_idx", padding_idx)  # numpy, 0-d tensors too
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"nn.EmbeddingBag: padding_idx must be within [-{num_embeddings}, {num_embeddings}); "
                                 f"got {padding_idx!r}")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.mode, self.padding_idx, self.include_last_offset = mode, padding_idx, include_last_offset
        self.sparse, self.backend, self.check = sparse, backend, check
        if _weight is None:
            # Not an inference tensor (built under inference_mode, it failed saving for a backward outside it,
            # where torch's trains; globals hunt). A _weight passed in is used as it is (an inference tensor
            # too: served weights loaded under inference_mode; review).
            with torch.inference_mode(False):
                self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
                self.reset_parameters()
        else:
            if tuple(_weight.shape) != (num_embeddings, embedding_dim):
                raise ValueError(f"_weight must be [{num_embeddings}, {embedding_dim}]; got {tuple(_weight.shape)}")
            if not _weight.is_contiguous():  # else the first forward refused it
                raise ValueError("_weight must be contiguous (the kernels read rows in place; pass "
                                 "_weight.contiguous())")
            # A Parameter of its own over _weight's memory, as torch's: from_pretrained's freeze (and a later
            # requires_grad_) then leaves a Parameter passed in (another module's) as it was (module hunt,
            # 2026-12-05: freezing froze the source module's weight). from_torch shares the Parameter itself.
            self.weight = nn.Parameter(_weight)

    def reset_parameters(self) -> None:
        """The table drawn from N(0, 1), as ``torch.nn.EmbeddingBag``'s, its padding row zero."""
        nn.init.normal_(self.weight)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].fill_(0)

    @classmethod
    def from_pretrained(cls, embeddings: Tensor, freeze: bool = True, max_norm: float | None = None,
                        norm_type: float = 2.0, scale_grad_by_freq: bool = False, mode: str = "mean",
                        sparse: bool = False, include_last_offset: bool = False, padding_idx: int | None = None,
                        backend: str = "auto", check: str = "sync") -> EmbeddingBag:
        """As ``torch.nn.EmbeddingBag.from_pretrained``: a module over ``embeddings [rows, dim]`` (used as
        the weight, not copied), frozen unless ``freeze=False``."""
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
            raise ValueError(f"from_pretrained: embeddings must be a 2-D tensor; got "
                             f"{tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings)}")
        if not embeddings.is_contiguous():  # (the constructor's error named its _weight)
            raise ValueError("from_pretrained: embeddings must be contiguous (the kernels read rows in place and "
                             "the module uses the tensor as its weight, not a copy: pass embeddings.contiguous())")
        m = cls(*embeddings.shape, mode, padding_idx, include_last_offset, sparse, _weight=embeddings,
                backend=backend, check=check, max_norm=max_norm, norm_type=norm_type,
                scale_grad_by_freq=scale_grad_by_freq)
        m.weight.requires_grad = not _checks.check_bool("from_pretrained", "freeze", freeze)  # ('False' froze)
        return m

    @classmethod
    def from_torch(cls, module: nn.EmbeddingBag, backend: str = "auto", check: str = "sync") -> EmbeddingBag:
        """A kfuse module sharing ``module``'s weight (not copied)."""
        if module.mode not in ("sum", "mean") or module.max_norm is not None or module.scale_grad_by_freq:
            raise ValueError("from_torch: kfuse.nn.EmbeddingBag supports mode 'sum'/'mean' without max_norm or "
                             "scale_grad_by_freq")
        m = cls(module.num_embeddings, module.embedding_dim, module.mode, module.padding_idx,
                module.include_last_offset, module.sparse, _weight=module.weight, backend=backend, check=check)
        m.weight = module.weight  # the same Parameter: its optimizer state and gradient are the torch module's
        return m

    def forward(self, input: Tensor, offsets: Tensor | None = None, per_sample_weights: Tensor | None = None) -> Tensor:
        """``[B, embedding_dim]`` for ``input [N]`` with ``offsets`` (``[B]``, or ``[B + 1]`` with
        ``include_last_offset``) or ``input [B, L]``: :func:`kfuse.embedding_bag` with this module's table and
        options."""
        # torch's module reads max_norm, norm_type and scale_grad_by_freq at every forward: one set after
        # construction meets the constructor's error rather than being ignored.
        return E.embedding_bag(input, self.weight, offsets, self.mode, per_sample_weights, self.include_last_offset,
                               self.padding_idx, sparse=self.sparse, backend=self.backend, check=self.check,
                               max_norm=self.max_norm, norm_type=self.norm_type,
                               scale_grad_by_freq=self.scale_grad_by_freq)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}, padding_idx={self.padding_idx}, "
                f"sparse={self.sparse}, backend={self.backend!r}, check={self.check!r}")


def _keys(n: int) -> list[str]:
    """A ParameterList's keys of n entries. Made per call (~2 us at 32 tables): no cache, which Dynamo traced
    into (functools.lru_cache: a warning, an error under -W error; feature-combination hunt) or guarded on (a
    dict filled while tracing: a second compile; review)."""
    return [str(i) for i in range(n)]


class MultiTableEmbeddingBag(nn.Module):
    """Many embedding tables pooled in one call (:func:`kfuse.multi_embedding_bag`).

    Args:
        tables: ``(rows, dim)`` of each table.
        feature_table_map: the table of each feature (default: one feature per table); several
            features may share a table.
        mode: ``"sum"`` (weighted when ``per_sample_weights`` is given) or ``"mean"``.
        padding_idx: skipped row, an int for every table or one entry per table (None: none).
        sparse: gradients as sparse tensors of unique ascending rows (eager; for ``torch.optim.SparseAdam`` &
            co.; ``.grad`` is not flagged coalesced: autograd's accumulation drops the flag).
        dtype, device: of the tables (float32, float16, bfloat16; float64 on the CPU).
        optimizer: None (ordinary autograd gradients), or a fused optimizer — ``"sgd"``,
            ``"rowwise_adagrad"`` (FBGEMM's exact row-wise Adagrad) or ``"adam"`` — that updates the
            tables inside the backward, one update per unique row after summing duplicates; the
            tables then get no ``.grad`` and must not be handed to another optimizer. fp16/bf16
            tables are rounded stochastically (seeded by ``seed`` and the step: reproducible); an fp16
            value past ±65504 rounds to ±65504, not to inf (as FBGEMM's rounding toward zero), so a
            diverging fp16 table saturates rather than overflowing.
            Eager only: its backward writes the tables and moments in place outside autograd, so
            ``torch.compile`` breaks the graph there (``fullgraph=True`` refuses the module); the
            module without it compiles whole. The update happens in the backward of each call, with the
            gradient as it arrives (as FBGEMM's): a module called twice before one backward updates twice
            (put every feature in one call); gradient accumulation over several backwards, gradient
            clipping and loss scaling (``torch.amp.GradScaler``: the update takes the scaled gradient, and
            a step the scaler skips is still applied) cannot act on it: build the module with
            ``optimizer=None`` and use a torch optimizer for those. Activation checkpointing: one
            checkpointed region per backward. A region recomputed after another's backward updated the
            tables would not reproduce its forward; the module raises where it can tell (no other forward
            of it ran since the region's), not in every order (two regions in flight with a forward of the
            module between them, as pipeline schedules run): keep the module outside checkpointed regions
            there, or use ``optimizer=None``. Selective checkpointing (``context_fn``, a dispatch mode) is
            refused. It trains every table while its
            gradient is asked for (``loss.backward()``, or ``torch.autograd.grad`` over the parameters that
            require grad, ``[p for p in m.parameters() if p.requires_grad]``: the fused tables themselves
            do not, and naming them raises; not a query for other inputs' gradients only);
            ``requires_grad_(False)`` on the
            module freezes them all (a fused table's own ``requires_grad`` is False and has no effect: to
            freeze tables one by one, use ``optimizer=None``). Each table and optimizer state must have
            memory of its own, not shared with another or with the call's ``per_sample_weights`` or
            gradient (a ``ValueError`` names the two).
        lr, eps, beta1, beta2, weight_decay: the fused optimizer's hyper-parameters (in ``hparams``,
            checked again at every update; change them between steps with :meth:`set_hyperparameters`,
            e.g. for a learning-rate schedule; like every constructor argument, not saved in ``state_dict``;
            unused with ``optimizer=None``, where a torch optimizer's own apply).
            The rules, per unique row r of the batch with summed gradient g (``kfuse.reference.embedding``
            writes them out; only rows in the batch are touched, a row whose gradient sums to 0 included):
            ``"sgd"`` w ← w − lr·(g + wd·w); ``"rowwise_adagrad"`` (FBGEMM's EXACT_ROWWISE_ADAGRAD) g' = g +
            wd·w, s ← s + mean(g'²) over the row, w ← w − lr·g'/(√s + eps); ``"adam"`` m, v as Adam's on g,
            w ← w − lr·(m̂/(√v̂ + eps) + wd·w), decoupled weight decay as AdamW's (not torch Adam's L2), and
            m̂, v̂ bias-corrected by one step count for the module (every backward advances it, as
            ``torch.optim.SparseAdam``'s), eps after the correction (SparseAdam adds it before).
        seed: of the stochastic rounding (its two 32-bit words xor-ed into the kernels' 32-bit key; seeds
            below 2**32 are used as they are).
        process_group: with a fused optimizer under data parallelism (refused without one), the group whose row-sparse
            gradients are all-gathered and summed (in rank order) before the update, so every rank
            applies the same update (summed, not averaged: scale a per-rank mean loss accordingly); None: no
            communication (each rank updates its own tables; a warning, once, when torch.distributed runs
            several processes). Inside ``DistributedDataParallel`` (for the model's dense layers) pass it
            ``broadcast_buffers=False``: it would re-send the optimizer states from rank 0 at every forward.
            Without a fused optimizer, ``sparse=True`` gradients cannot go through ``DistributedDataParallel``
            (it takes sparse gradients only from torch's embedding modules): use dense ones there. Under
            FullyShardedDataParallel (``fully_shard``, ``FSDP``) the fused optimizer refuses to run (the update
            would go into FSDP's gathered copies): leave the module out of FSDP (all its parameters in
            ``fully_shard``'s ``ignored_params``, or the module in ``FSDP``'s ``ignored_modules``) with a
            process_group, or use ``optimizer=None``, which FSDP shards as any module.
        backend: of the op (``"auto"``, ``"triton"``, ``"cpu"``, ``"reference"``).
        check: when the ``triton`` backend reports bad indices or offsets: ``"sync"`` (at the call, one host
            sync per forward) or ``"async"`` (at a later call, or :func:`kfuse.check_embedding_errors`;
            :data:`kfuse.ops.embedding.CHECKS`).

    Parameters: ``weights.{t}`` ``[rows_t, dim_t]``, initialised uniformly in ``±sqrt(1/rows_t)`` (FBGEMM's
    choice), padding rows zero; with a fused optimizer also ``_grad_anchor`` (``[0]``, not saved: its gradient
    tells the backward whether to update, and marks the module as used for ``DistributedDataParallel``).
    Fused-optimizer state lives in buffers (``state_dict`` saves and
    restores it, with the step count): ``momentum1_{t}`` (row-wise Adagrad ``[rows_t]``; Adam's m
    ``[rows_t, dim_t]``), ``momentum2_{t}`` (Adam's v; empty for the others), float32 (float64 for float64 tables), and
    ``optimizer_step`` (int64, the updates applied, on the CPU whatever the tables' device; a checkpoint's
    ``step`` key, its name before 2026-12-02, loads into it).

    ``forward(indices, offsets, per_sample_weights=None)`` with flat ``indices [N]`` and ``offsets
    [F·B + 1]`` (feature-major), or a TorchRec ``KeyedJaggedTensor`` (its keys in feature order) →
    ``[B, Σ_f dim_{table(f)}]``.
    """

    # Built under inference_mode, the tables, states and anchor were inference tensors: trained outside it, the
    # anchor's view tracked no gradient and the fused optimizer never ran, silently (globals hunt).
    @torch.inference_mode(False)
    def __init__(self, tables: Sequence[tuple[int, int]], feature_table_map: Sequence[int] | None = None,
                 mode: str = "sum", padding_idx: int | Sequence[int | None] | None = None, sparse: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 optimizer: str | None = None, lr: float = 0.01, eps: float = 1e-8, beta1: float = 0.9,
                 beta2: float = 0.999, weight_decay: float = 0.0, seed: int = 0,
                 process_group: object | None = None, backend: str = "auto", check: str = "sync") -> None:
        super().__init__()
        E.check_mode("MultiTableEmbeddingBag", check)
        _backends.check_backend_name("MultiTableEmbeddingBag", backend)
        tables = _table_sizes(tables)
        if not tables or any(r < 1 or d < 1 for r, d in tables):
            raise ValueError(f"tables must be a non-empty list of (rows >= 1, dim >= 1); got {tables}")
        if optimizer is not None and optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be None or one of {OPTIMIZERS}; got {optimizer!r}")
        # (a string sparse was taken by truth, a complex or integer dtype failed at the first forward or in
        # torch: error-message hunt)
        _checks.check_bool("MultiTableEmbeddingBag", "sparse", sparse)
        dtype = torch.get_default_dtype() if dtype is None else dtype  # (None: torch's factories' meaning)
        if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"MultiTableEmbeddingBag: dtype must be float32, float64, float16 or bfloat16; got "
                            f"{dtype!r}")
        if optimizer is not None and sparse:
            raise ValueError("sparse gradients and a fused optimizer exclude each other (the fused optimizer "
                             "materialises no gradient)")
        self.tables = tables
        if feature_table_map is None:
            self.feature_table_map = list(range(len(tables)))
        else:  # any iterable of integers (an int failed in list(): error-message hunt; numpy's ints too)
            ftm = feature_table_map.tolist() if hasattr(feature_table_map, "tolist") else feature_table_map
            try:
                items = [] if isinstance(ftm, (str, bytes)) else list(ftm)
            except TypeError:
                items = []
            self.feature_table_map = [t if (t := _checks.int_or_none(e)) is not None else e for e in items]
        if not self.feature_table_map or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(tables)
                                                 for t in self.feature_table_map):
            raise ValueError(f"feature_table_map must be a non-empty list of table numbers in [0, {len(tables)}); "
                             f"got {feature_table_map!r}")
        self.mode, self.sparse, self.backend, self.check = mode, sparse, backend, check
        if process_group is not None and optimizer is None:
            # Nothing would read it: the ranks' gradients went unsynchronised, silently (drop-in hunt)
            raise ValueError("process_group is the fused optimizer's (the group its row-sparse gradients are summed "
                             "over); with optimizer=None the gradients are autograd's: wrap the model in "
                             "DistributedDataParallel to synchronise them")
        if process_group is not None:
            _group_size(process_group)
        self.optimizer, self.seed, self.process_group = optimizer, _seed(seed), process_group
        self.hparams = _hparams(lr=lr, eps=eps, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(r, d, dtype=dtype, device=device), requires_grad=optimizer is None)
            for r, d in tables)
        # One row per table (None: none), non-negative: a valid padding_idx argument of the op as it is.
        self.padding_idx = [None if p < 0 else p
                            for p in E._padding("MultiTableEmbeddingBag", padding_idx, list(self.weights))]
        E._validate("MultiTableEmbeddingBag", list(self.weights), torch.zeros(0, dtype=torch.int64, device=device),
                    torch.zeros(len(self.feature_table_map) + 1, dtype=torch.int64, device=device),
                    self.feature_table_map, mode, None, self.padding_idx)
        if optimizer is not None:
            for t, (r, d) in enumerate(tables):
                shape1 = (r,) if optimizer == "rowwise_adagrad" else (r, d) if optimizer == "adam" else (0,)
                state = acc_dtype(dtype)  # float32; float64 for float64 tables
                self.register_buffer(f"momentum1_{t}", torch.zeros(shape1, dtype=state, device=device))
                self.register_buffer(f"momentum2_{t}", torch.zeros((r, d) if optimizer == "adam" else (0,),
                                                                   dtype=state, device=device))
            # Not "step": that name would stop a subclass from defining a step() method.
            # On the CPU whatever the tables' device (and a torch.device context): see _apply.
            self.register_buffer("optimizer_step", torch.zeros((), dtype=torch.int64, device="cpu"))
            # The backward hook (FBGEMM's placeholder): a zero-size parameter that requires grad, so that
            # autograd reaches the fused backward although the tables themselves do not require
            # gradients. A parameter, it follows the module: requires_grad_(False) on this module or one
            # above it freezes the tables (the fused backward then does not run), as it would ordinary
            # ones. It holds nothing, so state_dict leaves it out.
            self._grad_anchor = nn.Parameter(torch.zeros(0, dtype=dtype, device=device))
        self.reset_parameters()

    def set_hyperparameters(self, **hparams: float) -> None:
        """Sets some of the fused optimizer's ``lr``, ``eps``, ``beta1``, ``beta2``, ``weight_decay`` for the
        updates from now on (a learning-rate schedule calls it between steps), checked as the constructor
        checks them; the others keep their values. ``hparams`` was a plain dict, whose writes nothing
        checked (a NaN lr turned the tables NaN; training-loop hunt)."""
        if self.optimizer is None:
            raise RuntimeError("MultiTableEmbeddingBag.set_hyperparameters: this module has no fused optimizer "
                               "(optimizer=None): set the torch optimizer's param_groups instead")
        unknown = sorted(set(hparams) - set(self.hparams))
        if unknown:
            raise TypeError(f"MultiTableEmbeddingBag.set_hyperparameters: unknown {unknown}; the fused optimizer's "
                            f"are {sorted(self.hparams)}")
        self.hparams.update(_hparams(**{**self.hparams, **hparams}))  # in place: a held reference sees it

    def reset_parameters(self) -> None:
        """Fresh tables (uniform in ±1/sqrt(rows), padding rows zero) and, with a fused optimizer, fresh
        optimizer state (zero moments, step 0): after ``to_empty()`` every buffer is uninitialised."""
        with torch.no_grad():
            for w, p in zip(self.weights, self.padding_idx, strict=True):
                bound = math.sqrt(1.0 / w.shape[0])
                w.uniform_(-bound, bound)
                if p is not None:
                    w[p].fill_(0)
        self.reset_optimizer_state()

    def reset_optimizer_state(self) -> None:
        """A fresh fused-optimizer state (zero moments, step 0), the tables as they are; nothing without one."""
        if self.optimizer is not None:
            with torch.no_grad():
                for s in (*self.states(1), *self.states(2)):
                    s.zero_()
                self.optimizer_step.zero_()

    def _apply(self, fn, recurse: bool = True):
        # The step count stays on the CPU through .cuda() / .to() / .to_empty(): the fused backward reads it
        # with int() every step, a host sync were it on a GPU (and impossible on meta). It is still a buffer,
        # so state_dict saves it. A result on the CPU is taken (to_empty(device="cpu"): reset_parameters
        # then zeroes it), one elsewhere is not.
        # The moments keep the accumulation dtype of the tables' dtype through .half() / .to(dtype), which
        # would otherwise cast them with the tables (and lose them: Adam's v underflows in float16); the
        # values are taken from before the cast.
        step = self._buffers.get("optimizer_step")
        apply_keeping_dtype(self, lambda: super(MultiTableEmbeddingBag, self)._apply(fn, recurse),
                            [n for n in self._buffers if n.startswith("momentum")],
                            lambda: acc_dtype(self.weights[0].dtype))
        if step is not None and self._buffers["optimizer_step"].device.type != "cpu":
            self._buffers["optimizer_step"] = step
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "_grad_anchor", None)

    # A process group is a live communicator, which neither pickles nor copies ("cannot pickle ProcessGroup";
    # copy hunt): a pickled module (torch.save of it) leaves it out, as DistributedDataParallel does (set
    # process_group again after loading), and copy.deepcopy shares it.
    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "process_group": None}

    def __copy__(self) -> MultiTableEmbeddingBag:
        """A shallow copy shares the tables, states and group; its hyper-parameters are its own (the dict is
        changed in place: set_hyperparameters on the copy changed the original's)."""
        new = type(self).__new__(type(self))
        new.__setstate__({**super().__getstate__(), "hparams": dict(self.hparams)})
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> MultiTableEmbeddingBag:
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(super().__getstate__(), memo))
        return new

    @pre_hooks_first
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        old = prefix + "step"  # the buffer's name in checkpoints written before 2026-12-02
        if self.optimizer is not None and old in state_dict and prefix + "optimizer_step" not in state_dict:
            state_dict[prefix + "optimizer_step"] = state_dict.pop(old)
        if self.optimizer is not None:  # never saved (see __init__): one like the incoming tables, so that an
            # assign=True load (after a meta-device build) does not put the meta one back (module-conventions hunt)
            # Not an inference tensor either (see _tables): loaded under torch.inference_mode, the fused optimizer
            # never ran after it (inference hunt, 2026-12-07).
            w = state_dict.get(prefix + "weights.0")
            if isinstance(w, Tensor):
                with torch.inference_mode(False):
                    state_dict.setdefault(prefix + "_grad_anchor",
                                          nn.Parameter(torch.zeros(0, dtype=w.dtype, device=w.device)))
            state_dict.setdefault(prefix + "_grad_anchor", self._grad_anchor)
            if args and args[0].get("assign_to_params_buffers", False):  # (local_metadata)
                self._check_assigned_states(state_dict, prefix, args[-1])
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _check_assigned_states(self, state_dict: dict[str, Any], prefix: str, error_msgs: list[str]) -> None:
        """Optimizer states that load_state_dict(assign=True) would make the buffers must be as the constructor
        makes them: contiguous, in the accumulation dtype of their table's dtype, on its device (the C++ kernels
        refused others in the backward, while the reference trained on, e.g., Adam's v in float16:
        module-conventions hunt). Shapes torch checks itself; a copying load converts the rest."""
        for t in range(len(self.weights)):
            w = state_dict.get(f"{prefix}weights.{t}", self.weights[t])
            for which in (1, 2):
                s = state_dict.get(f"{prefix}momentum{which}_{t}")
                if not isinstance(s, Tensor) or not isinstance(w, Tensor):
                    continue
                acc, key = acc_dtype(w.dtype), f"{prefix}momentum{which}_{t}"
                if s.dtype != acc or s.device != w.device or not s.is_contiguous():
                    error_msgs.append(f"{key}: with assign=True it must be a contiguous {acc} tensor on {w.device}, "
                                      f"as table {t} is {w.dtype} there; got a "
                                      f"{'' if s.is_contiguous() else 'non-contiguous '}{s.dtype} tensor on "
                                      f"{s.device}")
                    state_dict[key] = self._buffers[f"momentum{which}_{t}"]  # not assigned (review)

    def states(self, which: int) -> list[Tensor]:
        """The fused optimizer's ``momentum{which}`` buffers, one per table."""
        return [getattr(self, f"momentum{which}_{t}") for t in range(len(self.tables))]

    def _weights(self) -> list[Tensor]:
        """The tables, in order: what ``list(self.weights)`` gives, without ParameterList's ``__getattr__``
        per table (50 us a call at 32 tables, as much as the rest of the op's host time; 2-core CPU). By key, not
        by the dict's order (a parametrization removed re-registers its table last); a table that is not a
        plain entry (parametrized, pruned) goes through ParameterList (review of the change)."""
        params = self.weights._parameters
        try:
            return [params[k] for k in _keys(len(self.weights))]
        except KeyError:
            return list(self.weights)

    @property
    def embedding_dim(self) -> int:
        """Width of the output: ``Σ_f dim_{table(f)}``."""
        return sum(self.tables[t][1] for t in self.feature_table_map)

    def extra_repr(self) -> str:
        opt = "" if self.optimizer is None else f", optimizer={self.optimizer!r}, lr={self.hparams['lr']:g}"
        return (f"tables={self.tables}, feature_table_map={self.feature_table_map}, mode={self.mode!r}, "
                f"padding_idx={self.padding_idx}, sparse={self.sparse}{opt}, backend={self.backend!r}, "
                f"check={self.check!r}")

    def forward(self, indices: Tensor | KeyedJaggedTensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None) -> Tensor:
        if type(indices).__name__ == "KeyedJaggedTensor":  # torchrec (optional): no import needed
            kjt = indices
            if len(kjt.keys()) != len(self.feature_table_map):
                raise ValueError(f"the KeyedJaggedTensor has {len(kjt.keys())} keys; this module has "
                                 f"{len(self.feature_table_map)} features")
            indices, offsets = kjt.values(), kjt.offsets()
            if per_sample_weights is None:
                per_sample_weights = kjt.weights_or_none()
        if offsets is None:
            raise ValueError("offsets is required with flat indices")
        ws = self._weights()
        if self.optimizer is None:
            return E.multi_embedding_bag(ws, indices, offsets, self.feature_table_map, self.mode, per_sample_weights,
                                         self.padding_idx, sparse=self.sparse, backend=self.backend, check=self.check)
        op = "MultiTableEmbeddingBag"
        _backends.check_backend_name(op, self.backend)
        params = self.weights._parameters
        computed = [f"weights.{k}" for k in _keys(len(self.weights)) if k not in params]
        if computed:
            # A table that is not a parameter of its own is computed at each read (a parametrization, or a pruning
            # mask times weights.k_orig): the update went into that temporary. Parametrized, the backward failed
            # naming swapped tables (module-conventions hunt); pruned, the training of the table was lost with
            # no error, state_dict saving weights.k_orig unchanged (module-conventions hunt, 2026-12-07).
            raise RuntimeError(f"{op}: the fused optimizer (optimizer={self.optimizer!r}) updates the tables in place, "
                               f"but {', '.join(computed)} {'is' if len(computed) == 1 else 'are'} computed at each "
                               "read (parametrized with torch.nn.utils.parametrize, or pruned with "
                               "torch.nn.utils.prune): a computed table cannot take the update. Build the module "
                               "with optimizer=None (a torch optimizer then updates the parameters it is computed "
                               "from).")
        if self.weights.__dict__.get("_is_fsdp_managed_module"):
            # (torch's mark of the modules whose parameters fully_shard or FullyShardedDataParallel manage: not the
            # tables' ParameterList when they are all in fully_shard's ignored_params or in FSDP's ignored_modules.)
            # The update went into the gathered copies, which FSDP frees after the backward: FSDP (use_orig_params)
            # trained nothing, silently, and fully_shard failed inside torch after the update was counted (FSDP
            # hunt, 2026-12-06). (FSDP's ignored_states marks them too, though it leaves them whole: refused.)
            raise RuntimeError(
                f"{op}: the fused optimizer (optimizer={self.optimizer!r}) updates the module's tables in place in "
                "the backward, but FullyShardedDataParallel (fully_shard or FSDP) shards them: the update would go "
                "into the gathered copies FSDP frees after the backward, and no step would last. Keep the module "
                "out of FSDP (fully_shard(..., ignored_params=set(module.parameters())), or "
                "FullyShardedDataParallel(..., ignored_modules=[module])) and pass process_group= for data-parallel "
                "training, or build it with optimizer=None (a torch optimizer then updates the sharded tables).")
        # (Strict torch.export traces with Dynamo, as torch.compile does, but cannot break the graph: it failed on
        # a torch.compiler.disable'd check below, naming kfuse's internals; export hunt.)
        if _routing.exporting() or (not torch.compiler.is_compiling() and _routing.route(
                "eager", [indices, offsets, per_sample_weights, *ws]) != _routing.EAGER):
            # make_fx, non-strict torch.export and fake tensors recorded a graph of one torch.empty (the
            # kernel reads raw pointers): run, it returned uninitialised memory (bug hunt). (torch.compile
            # breaks the graph before the call instead, and runs it eagerly.)
            raise RuntimeError(
                f"{op}: the fused optimizer (optimizer={self.optimizer!r}) runs eagerly only: this call is "
                "traced, transformed or under a torch dispatch mode (make_fx, torch.export, fake or other tensor "
                "subclasses, torch.func, forward-mode AD, selective activation checkpointing's context_fn), which "
                "could record neither the lookup nor the update. Build the module with optimizer=None (a torch "
                "optimizer then updates it).")
        E.poll_errors()
        ws, tables = E._check_weights(op, ws)  # as the op checks them (load_state_dict(assign=True) may bring any
        # layout)
        _check_unaliased(op, self, ws, per_sample_weights=per_sample_weights)
        bags = E._validate(op, ws, indices, offsets, self.feature_table_map, self.mode, per_sample_weights,
                           self.padding_idx, self.check, tables)
        chosen = E._select(op, self.backend, ws[0])
        step = int(self.optimizer_step)  # a CPU tensor: no sync
        if torch._C._current_graph_task_id() == -1:
            self.__dict__["_forward_step"] = step
        elif torch.is_grad_enabled() and step != self.__dict__.get("_forward_step", step):
            # A forward inside a backward, with grad mode on: activation checkpointing recomputing it (a no_grad
            # forward there, for logging from a hook, is none: it was refused; re-entrancy hunt). Another region's
            # backward has updated the tables since the original forward, so the recomputed output (and every
            # gradient downstream) would differ from it, silently (torch checks only shapes; training-utilities
            # hunt).
            raise RuntimeError(
                f"{op}: activation checkpointing recomputes this forward after the fused optimizer updated the "
                "tables (another checkpointed call's backward ran first), so it would not reproduce the original "
                "output. Keep the module's calls outside checkpointed regions, or use one region per backward.")
        # The anchor through a view: its node (not the leaf's AccumulateGrad, which autograd.grad cannot be
        # asked about) tells the backward whether its gradient is wanted.
        anchor = self._grad_anchor.view_as(self._grad_anchor)
        return _FusedEmbeddingBag.apply(self, indices, offsets, bags, chosen, anchor,
                                        E._kernel_psw(per_sample_weights, ws))


class _FusedEmbeddingBag(torch.autograd.Function):
    """Forward as usual; the backward updates the tables (no gradient is returned for them)."""

    @staticmethod
    def forward(ctx, module: MultiTableEmbeddingBag, indices: Tensor, offsets: Tensor, bags, backend: str,
                anchor: Tensor, psw: Tensor | None) -> Tensor:
        ctx.module, ctx.bags, ctx.backend = module, bags, backend
        ctx.tables = module._weights()  # the backward checks it updates what this forward read
        # The step the tables are at, and their versions, for a per_sample_weights gradient only (a CPU tensor:
        # no sync). Tables made under inference mode have no version (reading one raises: review).
        ctx.step = None if psw is None else int(module.optimizer_step)
        wanted = psw is not None and ctx.needs_input_grad[6]
        ctx.versions = [_routing.version(w) for w in ctx.tables] if wanted else None
        ctx.save_for_backward(indices, offsets, psw)
        return E._forward_impl(ctx.tables, indices, offsets, bags, psw, backend)

    @staticmethod
    # torch._disable_dynamo: torch.compiler.disable made at the first call. The decorator itself imports Dynamo,
    # which made `import kfuse` 1.2 s instead of 0.1 (bench/results/2026-12-06-cpu-import-time.md); Dynamo skips
    # the wrapper (a torch function), so compiled steps run as with the decorator. Eager as a whole: see below.
    @torch._disable_dynamo
    def backward(ctx, grad_out: Tensor):
        # Under torch.compile the engine ran this on the compiled step's thread and Dynamo traced it in pieces
        # (breaking at the pybind update, int(), the unaliased check); with dynamic=True a resume frame's guard
        # on a per-step object failed every step, one recompile a step until the recompile limit (8), ~255 ms
        # each (dynamic-shapes hunt, 2026-12-06).
        m: MultiTableEmbeddingBag = ctx.module
        if _routing.batched_backward(grad_out):  # (it failed inside, reading the batched gradient's memory)
            raise ValueError(
                "MultiTableEmbeddingBag: a batched backward (torch.autograd.grad(..., is_grads_batched=True), "
                "jacobian(vectorize=True), a torch.func transform) of a module with a fused optimizer, which updates "
                "its tables from one gradient; build it with optimizer=None for that (nothing was changed)")
        indices, offsets, psw = ctx.saved_tensors
        tables = m._weights()
        if len(ctx.tables) != len(tables) or any(a is not b for a, b in zip(ctx.tables, tables, strict=True)):
            # torch.func.functional_call swaps the tables back before the backward: the update (and the
            # per_sample_weights gradient) read the module's own tables, not the ones the forward read
            # (training-utilities hunt).
            raise RuntimeError(
                "MultiTableEmbeddingBag: the tables this call's forward read are no longer the module's (swapped "
                "by torch.func.functional_call, or replaced between forward and backward), and the fused "
                "optimizer updates the module's own tables and optimizer states. Build the module with "
                "optimizer=None to call it with other tables.")
        ws = [w.data for w in tables]
        _check_unaliased("MultiTableEmbeddingBag backward", m, ws, grad_out=grad_out)
        g_psw = None
        # Whether this backward asks for the anchor's gradient: not when the module is frozen
        # (requires_grad_(False)), nor for a query of other inputs' gradients only (torch.autograd.grad of
        # per_sample_weights, backward(inputs=...)), which updated the tables (training-loop hunt).
        # The anchor's view node (None when it does not require grad): next_functions lists the tensor inputs
        # only (indices, offsets, anchor, per_sample_weights).
        anchor = ctx.next_functions[2][0]
        train = anchor is not None and torch._C._will_engine_execute_node(anchor)
        if psw is not None and ctx.needs_input_grad[6]:  # before the tables change
            if int(m.optimizer_step) != ctx.step:
                raise RuntimeError(
                    "MultiTableEmbeddingBag: the gradient of per_sample_weights needs the tables as this call's "
                    "forward read them, but the fused optimizer has updated them since (another call's backward "
                    "ran first, or this call's own with retain_graph=True). Run each call's backward once, "
                    "before the next forward, or do not ask for the gradient of per_sample_weights.")
            if [_routing.version(w) for w in tables] != ctx.versions:
                # (The tables are not saved for backward, so autograd's own check could not see it: the gradient
                # was computed from the edited tables; in-place hunt, 2026-12-05.)
                raise RuntimeError(
                    "MultiTableEmbeddingBag: the gradient of per_sample_weights needs the tables as this call's "
                    "forward read them, but they have been modified in place since (load_state_dict, an in-place "
                    "edit): one of the variables needed for gradient computation has been modified by an inplace "
                    "operation")
            # Under create_graph=True (grad mode on here) the reference's, which is differentiable: the kernels'
            # gradient has no graph, and a second derivative through per_sample_weights silently lost the
            # lookup's part (function-transforms hunt, 2026-12-07).
            g_psw = E._psw_impl(grad_out, ws, indices, offsets, ctx.bags, psw,
                                "reference" if torch.is_grad_enabled() else ctx.backend)
        if not train:
            return None, None, None, None, None, None, g_psw
        if m.process_group is None:
            _warn_unsynchronised(m)
        with torch.no_grad():
            step = int(m.optimizer_step) + 1  # on the CPU (MultiTableEmbeddingBag._apply): int() does not sync
            # A write into the dict is checked too (a NaN lr made the tables NaN), and normalised in place (a
            # scheduler may hold the dict: review of the change).
            h = m.hparams
            h.update(_hparams(**h))
            s1 = m.states(1) if m.optimizer != "sgd" else []
            s2 = m.states(2) if m.optimizer == "adam" else []
            idx, off, flat_psw = E._flat(indices, offsets, psw)
            args = (_backends.dense(grad_out), ws, idx, off, ctx.bags.feature_table, ctx.bags.padding_idx,
                    ctx.bags.pooling, flat_psw, m.optimizer, s1, s2, h["lr"], h["eps"], h["beta1"], h["beta2"],
                    h["weight_decay"], step, _rounding_seed(m.seed))
            if ctx.backend == "cpu" and m.process_group is None:
                # The C++ call advances optimizer_step with the update: nothing (an interrupt) can come between.
                E._cpu("MultiTableEmbeddingBag backward", _backends.extension().embedding_backward_fused, *args,
                       m.optimizer_step)
            elif ctx.backend == "triton" and m.process_group is None:
                E._tk().backward_fused(*args)
                m.optimizer_step += 1
            else:
                parts = E._sparse_impl(grad_out, ws, indices, offsets, ctx.bags, psw, ctx.backend)
                if m.process_group is not None:
                    parts = [_all_reduce_rows(r, g, m.process_group) for r, g in parts]
                # Every table's new rows first, then the writes: a failure part-way (out of memory, an
                # interrupt) updated the first tables without counting the step (exceptions hunt).
                writes = [w for t, (rows, g) in enumerate(parts) for w in _row_updates(m, t, rows, g, step)]
                ext = _backends.extension()
                if ext is not None:  # the writes and the count in one call, as the cpu backend's (see there)
                    ext.embedding_apply_rows(*([w[k] for w in writes] for k in range(3)), m.optimizer_step, step)
                else:
                    for dst, rows, val in writes:
                        dst[rows] = val
                    m.optimizer_step += 1
            # (Each after the update: a refused one leaves the count with the tables. The triton backend's, in
            # Python after its launches, can miss an update interrupted as they return: as torch's optimizers.)
            # The tables changed outside autograd's sight (raw writes into .data aliases): their versions move, so
            # that another node of the graph that saved one (h @ W.t() before this call) raises torch's in-place
            # error rather than using the updated values (in-place hunt, 2026-12-05; ~9 us at 32 tables).
            for w in tables:
                torch.autograd.graph.increment_version(w)
        # An (empty) gradient for the anchor: it counts as used (DistributedDataParallel, optimizers).
        return None, None, None, None, None, m._grad_anchor.new_zeros(0), g_psw


def _span(t: Tensor) -> tuple[int, int]:
    """The bytes ``[start, end)`` that ``t``'s elements lie in (torch strides are non-negative)."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _share_memory(op: str, m: MultiTableEmbeddingBag, first: str, second: str) -> ValueError:
    first, second = sorted((first, second))
    return ValueError(f"{op}: {first} and {second} share memory; the fused optimizer ({m.optimizer!r}) updates "
                      "the tables and their states in place while it reads them, so each must have memory of its "
                      "own (pass a .clone())")


@torch._disable_dynamo  # data pointers: torch.compile runs it eagerly (see _FusedEmbeddingBag.backward)
def _check_unaliased(op: str, m: MultiTableEmbeddingBag, tables: list[Tensor], **others: Tensor | None) -> None:
    """``ValueError`` when two of the fused optimizer's tables and states, or one of them and one of
    ``others`` (the call's per_sample_weights, the backward's grad_out), share memory. The update writes the
    tables and states in place while it reads them and the gradients, task by task: two tables on one
    storage (possible through ``load_state_dict(assign=True)``) were updated twice on the CPU backend and
    once by the reference, and per_sample_weights viewing a table gave schedule-dependent results (layout
    hunt, 2026-12-05).

    Tables and states are swept (sorted byte spans) only when one of them has moved (a key of their addresses
    and sizes: addresses are unique across devices, host and CUDA alike); each of ``others`` is then a binary
    search. 32 Adam tables (96 tensors): the check takes ~45 µs a call (quiet, 1 thread), where the sweep
    every call took 1.4 ms (review of the change). Non-contiguous states are left to the kernels, which refuse
    them (their span would overlap a neighbour's without sharing an element)."""
    dev = tables[0].device
    named = [(f"weights.{t}", w) for t, w in enumerate(tables)]
    named += [(n, b) for n, b in m._buffers.items() if n.startswith("momentum")]  # the dict: no __getattr__
    key = tuple((t.data_ptr(), t.numel()) for _, t in named)
    cached = m.__dict__.get("_memory_spans")
    if cached is None or cached[0] != key:
        spans = sorted((*_span(t), name) for name, t in named
                       if t.numel() and t.device == dev and t.is_contiguous())
        end, owner = -1, ""
        for start, stop, name in spans:
            if start < end:
                raise _share_memory(op, m, owner, name)
            end, owner = stop, name
        cached = m.__dict__["_memory_spans"] = (key, [s[0] for s in spans], [s[1] for s in spans],
                                                [s[2] for s in spans])
    _, starts, ends, names = cached
    for name, t in others.items():
        if t is not None and t.numel() and t.device == dev:
            start, stop = _span(t)
            i = bisect.bisect_left(starts, stop) - 1  # the last span starting before t ends (spans are disjoint)
            if i >= 0 and ends[i] > start:
                raise _share_memory(op, m, names[i], name)


def _warn_unsynchronised(m: MultiTableEmbeddingBag) -> None:
    """Once per module: a fused step without ``process_group`` while torch.distributed runs several
    processes updates each rank's tables from its own gradients (DistributedDataParallel, which the
    anchor's gradient satisfies, then lets the ranks' tables drift apart silently; bug hunt)."""
    dist = torch.distributed
    if m.__dict__.get("_warned_unsynchronised") or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        m.__dict__["_warned_unsynchronised"] = True
        warnings.warn(f"MultiTableEmbeddingBag: the fused optimizer ({m.optimizer!r}) updates this rank's tables "
                      f"from this rank's gradients only (process_group=None) while torch.distributed runs "
                      f"{dist.get_world_size()} processes: under data parallelism the ranks' tables drift apart. "
                      "Pass process_group= (e.g. torch.distributed.group.WORLD) to sum the row gradients of "
                      "all ranks, or build the module with optimizer=None.", stacklevel=2)


def _seed(seed: object) -> int:
    """The stochastic-rounding seed as an int in [0, 2**63) (the kernels take an int64); integers as
    torch takes them for an index (numpy, one-element tensors), not bools."""
    s = E._as_index(seed)
    if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < 2**63:
        raise ValueError(f"MultiTableEmbeddingBag: seed must be an int in [0, 2**63); got {seed!r}")
    return s


def _rounding_seed(seed: object) -> int:
    """The 32-bit key the kernels' stochastic rounding takes: the seed's high word xor-ed into its low one.
    The kernels used the low word alone, so seeds 5 and 5 + 2**32 (a rank in the high word) gave every
    rank the same rounding (optimizer hunt, 2026-12-05); seeds below 2**32 keep their streams."""
    seed = _seed(seed)  # (also checks a seed set on the module after construction)
    return (seed ^ (seed >> 32)) & 0xFFFFFFFF


def _table_sizes(tables: object) -> list[tuple[int, int]]:
    """``tables`` as (rows, dim) int pairs; integers of any kind (numpy, 0-d integer tensors), never
    a float or string truncated to one (int(10.9) made a 10-row table)."""
    if isinstance(tables, (str, bytes)) or not isinstance(tables, Sequence):
        raise TypeError("MultiTableEmbeddingBag: tables must be a list of (rows, dim) pairs; "
                        f"got {type(tables).__name__}")
    out = []
    for t in tables:
        try:
            r, d = t
            out.append((_checks.integer("", "rows", r), _checks.integer("", "dim", d)))
        except (TypeError, ValueError):
            raise TypeError("MultiTableEmbeddingBag: tables must be a list of (rows, dim) pairs of ints; "
                            f"got {t!r}") from None
    return out


def _hparams(**given: object) -> dict[str, float]:
    """The fused optimizer's hyper-parameters as floats, checked as torch.optim checks its own
    (numbers or one-element tensors, read once here: the kernels take them as scalars)."""
    out = {}
    for name, v in given.items():
        if isinstance(v, Tensor) and v.numel() == 1 and v.is_floating_point():
            v = v.item()
        out[name] = _checks.real("MultiTableEmbeddingBag", name, v, finite=True)
    for name in ("lr", "eps", "weight_decay"):
        if out[name] < 0:
            raise ValueError(f"MultiTableEmbeddingBag: {name} must be >= 0; got {out[name]}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= out[name] < 1.0:
            raise ValueError(f"MultiTableEmbeddingBag: {name} must be in [0, 1); got {out[name]}")
    return out


def _all_reduce_rows(rows: Tensor, grads: Tensor, group: object) -> tuple[Tensor, Tensor]:
    """Row-sparse gradients summed over the ranks of ``group``: every rank's (rows, grads) all-gathered
    (padded to the largest count), then duplicates summed in rank order (deterministic)."""
    import torch.distributed as dist  # noqa: PLC0415

    world = _group_size(group)
    count = torch.tensor([rows.numel()], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    most = int(max(int(c) for c in counts))
    pad_rows = torch.full((most,), -1, dtype=torch.int64, device=rows.device)
    pad_rows[: rows.numel()] = rows
    pad_g = grads.new_zeros((most, grads.shape[1]))
    pad_g[: rows.numel()] = grads
    all_rows = [torch.empty_like(pad_rows) for _ in range(world)]
    all_g = [torch.empty_like(pad_g) for _ in range(world)]
    dist.all_gather(all_rows, pad_rows, group=group)
    dist.all_gather(all_g, pad_g, group=group)
    r = torch.cat([a[: int(c)] for a, c in zip(all_rows, counts, strict=True)])
    g = torch.cat([a[: int(c)] for a, c in zip(all_g, counts, strict=True)])
    uniq, inv = torch.unique(r, return_inverse=True)
    out = g.new_zeros((uniq.numel(), g.shape[1]))
    for k in range(world):  # rank order: the same additions on every rank
        lo = sum(int(c) for c in counts[:k])
        out.index_add_(0, inv[lo: lo + int(counts[k])], g[lo: lo + int(counts[k])])
    return uniq, out


def _group_size(group: object) -> int:
    """The number of processes in ``group``, a torch.distributed process group that includes this one.
    ``new_group`` gives a process outside the group a marker (an int), and torch answers -1 for the size
    of a group without this process, whose collectives then return at once: the row all-gather was left
    with no counts ("max() arg is an empty sequence"; bad-input hunt)."""
    import torch.distributed as dist  # noqa: PLC0415

    outside = dist.is_available() and isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER
    try:  # (duck-typed, as torch's collectives take it: c10d backends made directly are no ProcessGroup)
        world = -1 if outside else dist.get_world_size(group)
    except (AttributeError, TypeError, RuntimeError) as e:
        raise TypeError("MultiTableEmbeddingBag: process_group must be a torch.distributed process group (e.g. "
                        f"torch.distributed.group.WORLD) or None; got {type(group).__name__}") from e
    if world < 1:
        raise ValueError(f"MultiTableEmbeddingBag: process_group does not include this process (global rank "
                         f"{dist.get_rank()}); pass a group of the processes that train this module together")
    return world


def _row_updates(m: MultiTableEmbeddingBag, t: int, rows: Tensor, g: Tensor,
                 step: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """One fused-optimizer update of table ``t``'s ``rows`` with their summed gradients ``g`` (torch ops;
    the reference's rules and stochastic rounding), as writes ``(tensor, rows, values)`` for the
    caller to apply: the table and its optimizer states are not changed here."""
    if rows.numel() == 0:
        return []
    w = m.weights[t].data
    h = m.hparams
    acc = acc_dtype(w.dtype)
    rows = rows.to(w.device)
    cur = w[rows].to(acc)
    writes: list[tuple[Tensor, Tensor, Tensor]] = []
    if m.optimizer == "sgd":
        new = sgd_update(cur, g.to(acc), h["lr"], h["weight_decay"])
    elif m.optimizer == "rowwise_adagrad":
        s = m.states(1)[t]
        st = s[rows]  # a copy (advanced indexing), updated in place by the rule
        new = rowwise_adagrad_update(cur, g.to(acc), st, h["lr"], h["eps"], h["weight_decay"])
        writes = [(s, rows, st)]
    else:
        m1, m2 = m.states(1)[t], m.states(2)[t]
        a, b = m1[rows], m2[rows]
        new = adam_update(cur, g.to(acc), a, b, h["lr"], h["beta1"], h["beta2"], h["eps"], step, h["weight_decay"])
        writes = [(m1, rows, a), (m2, rows, b)]
    if w.dtype in (torch.float16, torch.bfloat16):
        cols = torch.arange(w.shape[1], device=w.device).unsqueeze(0)
        u = rounding_bits(_rounding_seed(m.seed), step, t, rows.unsqueeze(1), cols)
        return [*writes, (w, rows, stochastic_round(new, w.dtype, u))]
    return [*writes, (w, rows, new.to(w.dtype))]
