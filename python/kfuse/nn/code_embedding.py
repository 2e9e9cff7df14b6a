"""The medical-code model of Wallis et al., "Learning Semantic Relationships from Medical Codes", on
kfuse's multi-table embedding bags.

- :class:`CodeEmbedding`: one table per domain (diagnoses, procedures, prescriptions) and a
  visit/patient encoder pooling each domain's codes (one :class:`kfuse.nn.MultiTableEmbeddingBag`
  call for all domains, fused sparse optimizer by default).
- :class:`GeneralCodeEmbedding`: the *general* embedding, learned from co-occurrence across all
  claims: CBOW with negative sampling over a visit's codes (a random code of the visit is the
  target; the mean of the visit's other codes, all domains, predicts it against ``negatives`` codes
  drawn from the unigram distribution to the power 0.75, as word2vec). The codes' vectors are the
  per-domain input tables; the output vectors are one extra table over all codes.
- :class:`CodeOutcomeModel`: a patient-level prediction (e.g. an admission next period) from the
  patient's pooled codes, in the paper's three variants — ``"general"`` (the general tables, frozen,
  and a linear head), ``"task"`` (task-specific tables learned for the task with the head) and
  ``"super"`` (the same codes looked up in both, the pooled outputs concatenated).

Every table module exists in three builds with the same interface (``impl``): ``"kfuse"``
(:class:`kfuse.nn.MultiTableEmbeddingBag`), ``"torch"`` (one ``torch.nn.EmbeddingBag`` per table,
sparse gradients, a torch optimizer) and ``"fbgemm"`` (FBGEMM's
``SplitTableBatchedEmbeddingBagsCodegen`` on the CPU, where ``fbgemm_gpu`` is installed), so the
demo times the same model on each. Vectors export to word2vec text or ``.npy`` + an index
(:func:`export_vectors`, :func:`load_vectors`).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import numbers
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kfuse import _checks
from kfuse._files import replaced
from kfuse.nn._buffers import apply_keeping_dtype
from kfuse.nn.embedding import MultiTableEmbeddingBag
from kfuse.reference.embedding import acc_dtype

if TYPE_CHECKING:  # (kfuse.data needs only numpy; the module takes its objects without importing it)
    from kfuse.data.claims import Claims, CodeVocab

__all__ = ["IMPLS", "CodeEmbedding", "CodeOutcomeModel", "GeneralCodeEmbedding", "cbow_batch", "export_vectors",
           "load_vectors", "neighbour_agreement", "predict_outcome", "train_general",
           "train_outcome"]

#: The builds of a table module: kfuse's kernels, a per-table torch.nn.EmbeddingBag loop, FBGEMM's CPU op.
IMPLS = ("kfuse", "torch", "fbgemm")
VARIANTS = ("general", "task", "super")


# ---------------------------------------------------------------- table builds


_GRAD_DTYPE = hasattr(torch.Tensor, "grad_dtype")  # a leaf's gradient in another dtype than its own (torch >= 2.10)


class _TorchTables(nn.Module):
    """One ``torch.nn.EmbeddingBag`` per table (sparse gradients) and a torch optimizer stepped by
    :meth:`update`: SGD for ``"sgd"``, ``torch.optim.Adagrad`` (element-wise; torch has no row-wise
    Adagrad) for ``"rowwise_adagrad"``, ``SparseAdam`` for ``"adam"`` (torch's rows-seen Adam: its eps
    enters before the bias correction, kfuse's after, as AdamW's)."""

    def __init__(self, tables: list[tuple[int, int]], mode: str, optimizer: str | None, lr: float, eps: float,
                 device: torch.device | str | None) -> None:
        super().__init__()
        self.bags = nn.ModuleList(nn.EmbeddingBag(r, d, mode=mode, sparse=optimizer is not None, device=device)
                                  for r, d in tables)
        params = [b.weight for b in self.bags]
        self.opt: torch.optim.Optimizer | None = None
        if optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=lr)
        elif optimizer == "rowwise_adagrad":
            self.opt = torch.optim.Adagrad(params, lr=lr, eps=eps)
        elif optimizer == "adam":
            self.opt = torch.optim.SparseAdam(params, lr=lr, eps=eps)
        elif optimizer is not None:  # (it trained nothing, silently: medical-code hunt 2026-12-05)
            raise ValueError(f"optimizer must be None or one of ('sgd', 'rowwise_adagrad', 'adam'); got {optimizer!r}")
        self.register_load_state_dict_post_hook(_TorchTables._load_optimizer_state)

    @property
    def weights(self) -> list[Tensor]:
        return [b.weight for b in self.bags]

    def reset_optimizer_state(self) -> None:
        """A fresh optimizer state, the tables as they are: the state a new optimizer of the same kind and
        settings makes (torch 2.11's Adagrad makes its sums in its constructor, and a cleared state failed its
        next step with KeyError 'sum': make compat)."""
        if self.opt is not None:
            self._track_tables()
            # The settings its constructor takes: torch's Optimizer.__setstate__ adds 'differentiable' to a copied
            # or unpickled SparseAdam's defaults, which SparseAdam's constructor refuses (TypeError; process hunt).
            takes = inspect.signature(type(self.opt)).parameters
            fresh = type(self.opt)(self.weights, **{k: v for k, v in self.opt.defaults.items() if k in takes})
            self.opt.state = fresh.state  # at once: cleared, then refilled, an interrupt left no state at all

    def reset_parameters(self) -> None:
        """A fresh optimizer state (the bags reset their own tables; :class:`CodeEmbedding` seeds them)."""
        self.reset_optimizer_state()

    def forward(self, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None = None) -> Tensor:
        nf = len(self.bags)
        b = (offsets.numel() - 1) // nf
        outs = []
        for f, bag in enumerate(self.bags):
            off = offsets[f * b: (f + 1) * b + 1]
            lo, hi = int(off[0]), int(off[-1])
            # torch's bag takes weights of the table's dtype only (a .half() build failed with float32 ones)
            psw = None if per_sample_weights is None else per_sample_weights[lo:hi].to(bag.weight.dtype)
            outs.append(bag(indices[lo:hi], off[:-1] - lo, per_sample_weights=psw))
        return torch.cat(outs, dim=1)

    def _track_tables(self) -> None:
        """Points the optimizer at the tables the module holds now, with their state: to_empty() and
        load_state_dict(assign=True) give the module new Parameters, and it stepped the old ones, training
        nothing (copy hunt)."""
        group = self.opt.param_groups[0]
        for i, (old, new) in enumerate(zip(group["params"], self.weights, strict=True)):
            if old is not new:
                if old in self.opt.state:
                    self.opt.state[new] = self.opt.state.pop(old)
                group["params"][i] = new

    def _apply(self, fn, recurse: bool = True):
        # .double() / .to(device) convert the tables; the optimizer's state follows them, in their accumulation
        # dtype as the kfuse build's buffers (it stayed float32 and on its device: 9e-8 off the kfuse build after
        # 100 float64 steps; training-loop hunt). Step counts stay as torch keeps them.
        super()._apply(fn, recurse)
        if self.opt is not None:
            self._track_tables()
            for p in self.weights:
                st = self.opt.state.get(p, {})
                for k, v in st.items():
                    if k != "step" and isinstance(v, Tensor) and v.is_floating_point():
                        like = {"device": p.device, "dtype": acc_dtype(p.dtype)}
                        # (from meta, to_empty: no values to move; reset_parameters then makes fresh ones)
                        st[k] = torch.empty(v.shape, **like) if v.is_meta else v.to(**like)
        return self

    def update(self) -> None:
        if self.opt is not None:
            _TorchTables._load_optimizer_state(self, None)  # (a module unpickled from before the hook)
            self._track_tables()
            raised: list[tuple[Tensor, Tensor]] = []
            stepped = False
            try:
                self._step_in_acc_dtype(raised)
                self.opt.step()
                stepped = True
                self.opt.zero_grad(set_to_none=True)
            finally:
                for p, g in raised:  # gradients in the tables' own dtype again, whatever it becomes: None follows it
                    p.grad = None  # (pinned to p.dtype, a later .float() kept float16 gradients: review)
                    p.grad_dtype = None
                    if not stepped:  # no step taken (an error, an interrupt): the gradient as the backward left it
                        p.grad = g

    def _step_in_acc_dtype(self, raised: list[tuple[Tensor, Tensor]]) -> None:
        """Makes the optimizer step half-precision tables in their accumulation dtype, as :meth:`_apply` keeps an
        existing state: SparseAdam's state, made lazily like the table at its first step, is made here in float32,
        and the gradients are handed over in float32 (``grad_dtype``, torch >= 2.10; older torch steps on the
        table's dtype). torch's optimizers compute in the gradient's dtype: after .half() SparseAdam's state was
        float16, its eps (1e-8) was 0 there and small squared gradients underflowed: NaN tables within 20 steps,
        float32 state or not; Adagrad's underflowed sums gave steps of lr·g/eps (the tables 50 off a float32
        build's in 20 steps; training-loop review). Appends to ``raised`` each table whose gradient dtype it
        raises, with its gradient, before changing either (an interrupt then left a table with no gradient, its
        step lost, and grad_dtype pinned: process hunt, 2026-12-07)."""
        for p in self.weights:
            acc, g = acc_dtype(p.dtype), p.grad
            if p.dtype == acc or g is None:
                continue
            if isinstance(self.opt, torch.optim.SparseAdam) and not self.opt.state.get(p):
                zeros = {"dtype": acc, "device": p.device}
                self.opt.state[p] = {"step": 0, "exp_avg": torch.zeros(p.shape, **zeros),
                                     "exp_avg_sq": torch.zeros(p.shape, **zeros)}
            if _GRAD_DTYPE and g.dtype != acc:
                wide = g.to(acc)
                raised.append((p, g))
                p.grad = None  # (grad_dtype cannot change under a gradient of the old one)
                p.grad_dtype = acc
                p.grad = wide

    def get_extra_state(self) -> dict:
        # The optimizer's state (Adagrad's sums, SparseAdam's moments) goes with state_dict, as the kfuse and
        # FBGEMM builds keep theirs in the module: a checkpoint resumes the same training in every build.
        _TorchTables._load_optimizer_state(self, None)  # (a state loaded into a module without the hook)
        return {} if self.opt is None else self.opt.state_dict()

    def set_extra_state(self, state: dict) -> None:
        # Loaded once the tables are (_load_optimizer_state): load_state_dict sets a module's extra state
        # before it loads its children, and the optimizer casts its state to its parameters' devices and
        # dtypes: a module built on meta and loaded with assign=True kept its state on meta (conversions hunt).
        self.__dict__["_optimizer_state"] = state if self.opt is not None and state else None

    @staticmethod
    def _load_optimizer_state(module: _TorchTables, _incompatible: object) -> None:
        state = module.__dict__.pop("_optimizer_state", None)
        if state is not None:
            # A copy: the optimizer's load_state_dict keeps the given tensors, which would tie this module's
            # state to the source's (as load_state_dict copies parameters into the module's own).
            module._track_tables()
            module.opt.load_state_dict(copy.deepcopy(state))
            # torch's load casts the state to each table's dtype: half tables got float16 sums and moments (and
            # Adagrad's NaN tables on resume, stepping them in float32: review); the saved values instead, in the
            # accumulation dtype, as _apply keeps them
            ids = [i for group in state["param_groups"] for i in group["params"]]  # (torch's own mapping)
            params = dict(zip(ids, (p for group in module.opt.param_groups for p in group["params"]), strict=True))
            for i, saved in state["state"].items():
                p = params[i]
                for k, v in saved.items():
                    if k != "step" and isinstance(v, Tensor) and v.is_floating_point():
                        module.opt.state[p][k] = v.to(device=p.device, dtype=acc_dtype(p.dtype), copy=True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        self.__dict__.pop("_optimizer_state", None)  # (one left by a load that failed after it)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "_extra_state"
        if key in missing_keys:  # a checkpoint from before 2026-12-03 (no optimizer state): a fresh one
            missing_keys.remove(key)


class _FbgemmTables(nn.Module):
    """FBGEMM's table-batched embedding bags on the CPU with its fused optimizer (``EXACT_SGD``,
    ``EXACT_ROWWISE_ADAGRAD``; its CPU build has no Adam); the update happens in the backward as kfuse's."""

    def __init__(self, tables: list[tuple[int, int]], mode: str, optimizer: str | None, lr: float, eps: float,
                 device: torch.device | str | None) -> None:
        super().__init__()
        if torch.device(device or "cpu").type != "cpu":
            raise ValueError("impl='fbgemm' runs on the CPU here (fbgemm-gpu-cpu); use impl='kfuse' on a GPU")
        try:
            tbe = importlib.import_module("fbgemm_gpu.split_table_batched_embeddings_ops_training")
            cfg = importlib.import_module("fbgemm_gpu.split_embedding_configs")
        except ImportError as err:
            raise ImportError(f"impl='fbgemm' needs fbgemm_gpu ({type(err).__name__}: {err})") from err
        # No Adam: FBGEMM's CPU build has none ("Optimizer adam is not supported in CPU mode").
        opt = {"sgd": cfg.EmbOptimType.EXACT_SGD, "rowwise_adagrad": cfg.EmbOptimType.EXACT_ROWWISE_ADAGRAD}
        if optimizer not in opt:
            raise ValueError(f"impl='fbgemm' needs a fused optimizer FBGEMM has on the CPU ({', '.join(opt)}); got "
                             f"{optimizer!r}")
        bad = [d for _, d in tables if d % 4]
        if bad:  # FBGEMM asserts it; say it as a ValueError, which the demo reports as a skipped build
            raise ValueError(f"impl='fbgemm' needs dims that are multiples of 4; got {bad}")
        specs = [(r, d, tbe.EmbeddingLocation.HOST, tbe.ComputeDevice.CPU) for r, d in tables]
        pooling = tbe.PoolingMode.SUM if mode == "sum" else tbe.PoolingMode.MEAN
        # FATAL bounds checks: by default FBGEMM logs an out-of-range index and looks up row 0 instead.
        self.tbe = tbe.SplitTableBatchedEmbeddingBagsCodegen(specs, optimizer=opt[optimizer], learning_rate=lr,
                                                             eps=eps, pooling_mode=pooling,
                                                             bounds_check_mode=tbe.BoundsCheckMode.FATAL)

    @property
    def weights(self) -> list[Tensor]:
        return list(self.tbe.split_embedding_weights())

    def reset_optimizer_state(self) -> None:
        """A fresh optimizer state: FBGEMM's moments and step count zero, the tables as they are."""
        with torch.no_grad():
            for name in ("momentum1_host", "momentum2_host", "prev_iter_host", "iter", "iter_cpu"):
                t = getattr(self.tbe, name, None)
                if isinstance(t, Tensor) and t.numel():
                    t.zero_()

    def forward(self, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None = None) -> Tensor:
        if per_sample_weights is not None and self.tbe.pooling_mode.name != "SUM":
            # FBGEMM's MEAN pooling takes them and returns sum(w x) / n, which no other build computes (the kfuse
            # build refuses them with kfuse's error, as torch's embedding_bag does; medical-codes hunt)
            raise ValueError("CodeEmbedding(impl='fbgemm'): per_sample_weights is only supported with mode='sum' (as "
                             "in torch.nn.functional.embedding_bag)")
        return self.tbe(indices, offsets, per_sample_weights=per_sample_weights)

    def update(self) -> None:
        pass


class _KfuseTables(MultiTableEmbeddingBag):
    """:class:`kfuse.nn.MultiTableEmbeddingBag` with the tables' interface (``weights``, ``step``)."""

    def update(self) -> None:
        pass


def _tables(tables: list[tuple[int, int]], mode: str, optimizer: str | None, lr: float, eps: float,
            weight_decay: float, impl: str, backend: str, device: torch.device | str | None, seed: int) -> nn.Module:
    if impl == "kfuse":
        return _KfuseTables(tables, mode=mode, optimizer=optimizer, lr=lr, eps=eps, weight_decay=weight_decay,
                            device=device, backend=backend, seed=seed)
    if weight_decay:
        raise ValueError(f"weight_decay is supported by impl='kfuse' only; got impl={impl!r}")
    if impl == "torch":
        return _TorchTables(tables, mode, optimizer, lr, eps, device)
    if impl == "fbgemm":
        return _FbgemmTables(tables, mode, optimizer, lr, eps, device)
    raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")


# ---------------------------------------------------------------- the encoder


class CodeEmbedding(nn.Module):
    """One embedding table per domain, pooling each domain's codes of a visit or patient.

    Args:
        sizes: codes per domain (rows of each table), e.g. ``vocab.sizes``.
        dim: embedding dimension D (every table).
        domains: the domains' names, in table order.
        mode: ``"mean"`` (each domain's codes averaged; an empty bag gives zeros) or ``"sum"``
            (weighted by ``per_sample_weights`` when given).
        optimizer: the fused sparse optimizer (``"sgd"``, ``"rowwise_adagrad"``, ``"adam"``), or None:
            ordinary ``.grad`` on the tables (kfuse build only).
        lr, eps, weight_decay: the optimizer's hyper-parameters.
        init_scale: the tables start uniform in ``±init_scale`` (default ``0.5 / dim``, word2vec's).
        impl: ``"kfuse"``, ``"torch"`` or ``"fbgemm"`` (see the module docstring).
        backend: kfuse's backend (``"auto"``, ``"cpu"``, ``"reference"``, ``"triton"``).
        device: of the tables (default: torch's default device).
        seed: of the tables' initialisation (:meth:`reset_parameters`) and, in the kfuse build, of the fused
            optimizer's stochastic rounding of half-precision tables.

    ``forward(indices [N], offsets [T·B + 1], per_sample_weights [N] = None)`` with feature ``t`` =
    domain ``t`` (feature-major, as :meth:`kfuse.data.Claims.visit_bags` gives) → ``[B, T·D]``.
    With a fused optimizer the tables are updated in the backward; call :meth:`update` after each
    backward all the same (the torch build's optimizer steps there).
    """

    def __init__(self, sizes: Sequence[int], dim: int = 128, domains: Sequence[str] = ("dx", "px", "rx"),
                 mode: str = "mean", optimizer: str | None = "rowwise_adagrad", lr: float = 0.05, eps: float = 1e-8,
                 weight_decay: float = 0.0, init_scale: float | None = None, impl: str = "kfuse",
                 backend: str = "auto", device: torch.device | str | None = None, seed: int = 0) -> None:
        super().__init__()
        if len(sizes) != len(domains):
            raise ValueError(f"sizes ({len(sizes)}) and domains ({len(domains)}) must have one entry per domain")
        if optimizer is None and impl != "kfuse":
            raise ValueError(f"optimizer=None (plain gradients) needs impl='kfuse'; got impl={impl!r}")
        self.sizes = [_checks.integer("CodeEmbedding", f"sizes[{i}]", s, 1) for i, s in enumerate(sizes)]
        self.dim, self.domains = _checks.integer("CodeEmbedding", "dim", dim, 1), tuple(domains)
        self.mode, self.impl, self.optimizer = mode, impl, optimizer
        self.tables = _tables([(s, self.dim) for s in self.sizes], mode, optimizer, lr, eps, weight_decay, impl,
                              backend, device, seed)
        self._init = (0.5 / self.dim if init_scale is None else init_scale, seed)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, scale: float | None = None, seed: int | None = None) -> None:
        """Tables uniform in ``±scale`` (seeded, the same in every build) and a fresh optimizer state; by
        default the constructor's ``init_scale`` and ``seed`` (a generic re-initialisation, which passes
        none, raised a TypeError; copy hunt). In a generic re-initialisation, call it after its children's
        own (``model.apply`` visits children first): the tables' own reset draws another initialisation."""
        scale = self._init[0] if scale is None else scale
        self.tables.reset_optimizer_state()  # (after to_empty() it held garbage; globals hunt)
        gen = torch.Generator().manual_seed(self._init[1] if seed is None else seed)
        for w in self.weights:  # float32 draws whatever torch's default dtype (the same tables in every build)
            w.copy_((torch.rand(w.shape, generator=gen, device="cpu", dtype=torch.float32) * 2 - 1) * scale)

    @property
    def weights(self) -> list[Tensor]:
        """The tables, ``[sizes[t], dim]`` each."""
        return list(self.tables.weights)

    @property
    def out_dim(self) -> int:
        """Width of the output: ``T·D`` (domains × dim)."""
        return len(self.domains) * self.dim

    def forward(self, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None = None) -> Tensor:
        """``[B, T·D]``: each domain's pooled codes side by side (the class docstring gives the layout)."""
        return self.tables(indices, offsets, per_sample_weights)

    def update(self) -> None:
        """After a backward: the torch build's optimizer step (the fused builds updated in the backward)."""
        self.tables.update()

    def vectors(self, domain: str) -> Tensor:
        """``[sizes[domain], dim]``: the learned vector of each code of ``domain`` (a detached copy, CPU)."""
        return self.weights[self.domains.index(domain)].detach().float().cpu().clone()

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, dim={self.dim}, domains={self.domains}, mode={self.mode!r}, impl={self.impl!r}"


# ---------------------------------------------------------------- the general embedding


def cbow_batch(indices: Tensor, offsets: Tensor, num_features: int, bases: Tensor, generator: torch.Generator
               ) -> tuple[Tensor, Tensor]:
    """CBOW targets of a batch of visits: for each visit one random code (any domain) is the target and
    the others are its context.

    ``indices [N]``, ``offsets [T·B + 1]``: the visits' codes, feature-major (each visit must have at
    least 2 codes); ``bases [T]``: each domain's first row in the all-codes numbering.
    Returns ``per_sample_weights [N]`` (``1 / (n_b − 1)`` for the context codes of visit b, 0 for its
    target: a sum pooling then gives the context's mean) and ``targets [B]`` (all-codes rows).
    """
    b = (offsets.numel() - 1) // num_features
    dev = indices.device
    lens = (offsets[1:] - offsets[:-1]).view(num_features, b)
    n = lens.sum(0)
    if b and int(n.min()) < 2:
        raise ValueError("cbow_batch: every visit needs at least 2 codes")
    u = torch.rand(b, generator=generator, device=generator.device, dtype=torch.float32)
    u = (u.to(dev) * n).long().clamp(max=n - 1)
    cum = lens.cumsum(0)
    feat = (u.unsqueeze(0) >= cum).sum(0)
    cols = torch.arange(b, device=dev)
    within = u - (cum[feat, cols] - lens[feat, cols])
    pos = offsets[feat * b + cols] + within
    targets = bases.to(dev)[feat] + indices[pos]
    bag = torch.repeat_interleave(torch.arange(num_features * b, device=dev) % b, lens.flatten(),
                                  output_size=indices.numel())
    psw = (1.0 / (n - 1).to(torch.float32))[bag]
    psw[pos] = 0.0
    return psw, targets


class GeneralCodeEmbedding(nn.Module):
    """The general embedding: CBOW with negative sampling over the codes of each visit.

    ``codes``: the per-domain input tables (:class:`CodeEmbedding`, ``mode="sum"`` with CBOW weights):
    the learned vectors. ``context``: the output vectors, one table over all codes (rows of domain t
    start at ``bases[t]``), initialised to zero as in word2vec. Args as :class:`CodeEmbedding`, plus
    ``negatives`` (K, per target).

    ``forward(indices, offsets, per_sample_weights, targets [B], negatives [B, K])`` → the mean over
    the batch of the negative-sampling loss (``−log σ(h·u_target) − Σ_k log σ(−h·u_neg_k)``, ``h`` the
    weighted sum of the context's vectors over all domains).
    """

    def __init__(self, sizes: Sequence[int], dim: int = 128, domains: Sequence[str] = ("dx", "px", "rx"),
                 negatives: int = 5, optimizer: str = "rowwise_adagrad", lr: float = 0.05, eps: float = 1e-8,
                 impl: str = "kfuse", backend: str = "auto", device: torch.device | str | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.codes = CodeEmbedding(sizes, dim, domains, mode="sum", optimizer=optimizer, lr=lr, eps=eps, impl=impl,
                                   backend=backend, device=device, seed=seed)
        total = sum(self.codes.sizes)
        # seed + 1 wrapped: any seed the tables take stays valid (2**63 − 1 made it 2**63, refused; bug hunt)
        self.context = _tables([(total, dim)], "sum", optimizer, lr, eps, 0.0, impl, backend, device,
                               (seed + 1) % 2**63)
        self.negatives = _checks.integer("GeneralCodeEmbedding", "negatives", negatives, 1)
        # Not inference tensors, as the tables (built under torch.inference_mode, set_noise failed outside it;
        # inference hunt, 2026-12-07).
        with torch.inference_mode(False):
            self.register_buffer("bases", torch.empty(len(self.codes.sizes), dtype=torch.int64, device=device))
            # Host-side (sample_negatives draws on the CPU), whatever the default device.
            self.register_buffer("noise_cdf", torch.empty(total, dtype=torch.float64, device="cpu"))
        self._reset_own()

    @torch.no_grad()
    def _reset_own(self) -> None:
        total = self.noise_cdf.numel()
        self.context.weights[0].zero_()
        self.bases.copy_(torch.tensor([0, *np.cumsum(self.codes.sizes)[:-1].tolist()], dtype=torch.int64,
                                      device="cpu"))
        self.noise_cdf.copy_(torch.linspace(1.0 / total, 1.0, total, dtype=torch.float64, device="cpu"))

    def reset_parameters(self) -> None:
        """The model as the constructor leaves it: the tables' own resets (fresh optimizer states), the code
        tables' seeded initialisation, ``context`` zero, ``bases`` and a uniform noise distribution
        (:meth:`set_noise` sets the counts'). After ``to_empty()`` the buffers held garbage, and training
        indexed past the tables (module hunt, 2026-12-05). In a generic re-initialisation, call it after
        its children's own (``model.apply`` visits children first): the context table's own reset is
        random, not zero."""
        for module in reversed(list(self.modules())[1:]):  # every child before its parent, as model.apply
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self._reset_own()

    def _apply(self, fn, recurse: bool = True):
        # The negatives' CDF stays float64 through .half() / .to(dtype): in float16 ~40 % of 6000 codes got
        # probability 0.
        apply_keeping_dtype(self, lambda: super(GeneralCodeEmbedding, self)._apply(fn, recurse), ["noise_cdf"],
                            lambda: torch.float64)
        return self

    def set_noise(self, counts: Sequence[np.ndarray] | Tensor, power: float = 0.75) -> None:
        """The negatives' distribution: ``counts`` (per domain, or one ``[Σ sizes]`` array) ``** power``
        (+1 smoothing, so every code can be drawn)."""
        c = torch.as_tensor(np.concatenate([np.asarray(x) for x in counts]) if isinstance(counts, (list, tuple))
                            else np.asarray(counts), dtype=torch.float64, device="cpu")
        if c.numel() != self.noise_cdf.numel():
            raise ValueError(f"set_noise: counts cover {c.numel()} codes; the model has {self.noise_cdf.numel()}")
        p = (c + 1.0) ** power
        cdf = torch.cumsum(p, 0)
        self.noise_cdf.copy_(cdf / cdf[-1])

    def sample_negatives(self, batch: int, generator: torch.Generator) -> Tensor:
        """``[batch, K]`` all-codes rows drawn from the noise distribution."""
        u = torch.rand(batch * self.negatives, generator=generator, dtype=torch.float64, device="cpu")
        idx = torch.searchsorted(self.noise_cdf.cpu(), u).clamp(max=self.noise_cdf.numel() - 1)
        return idx.view(batch, self.negatives).to(self.bases.device)

    def forward(self, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor, targets: Tensor,
                negatives: Tensor) -> Tensor:
        """The batch's mean negative-sampling loss (a 0-d tensor) for contexts ``indices [N]``, ``offsets
        [T·B + 1]`` with ``per_sample_weights [N]`` (float32), targets ``[B]`` and ``negatives [B, K]`` (rows of
        the all-codes context table: :meth:`sample_negatives`)."""
        b, k1 = targets.shape[0], negatives.shape[1] + 1
        # cbow_batch's float32 weights: float64 tables take them in float64.
        psw = per_sample_weights.to(acc_dtype(self.codes.weights[0].dtype))
        h = self.codes(indices, offsets, psw).view(b, len(self.codes.domains), -1).sum(1)
        cand = torch.cat([targets.unsqueeze(1), negatives], dim=1).reshape(-1)
        u = self.context(cand, torch.arange(b * k1 + 1, device=cand.device)).view(b, k1, -1)
        logits = torch.bmm(u, h.unsqueeze(2)).squeeze(2)  # [B, K+1]
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1.0
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / max(b, 1)

    def update(self) -> None:
        """After a backward: both tables' optimizer steps (see :meth:`CodeEmbedding.update`)."""
        self.codes.update()
        self.context.update()


def train_general(model: GeneralCodeEmbedding, claims: Claims, epochs: float = 1.0, batch_size: int = 1024,
                  seed: int = 0, progress: Callable[[str], None] | None = None,
                  max_seconds: float | None = None) -> dict:
    """Trains ``model`` on the visits of ``claims`` (:class:`kfuse.data.Claims`) with at least 2 codes,
    shuffled, ``epochs`` passes (fractions allowed); the noise distribution is set from the claims'
    code counts. Returns ``{"steps", "codes", "seconds", "codes_per_s", "loss_first", "loss_last"}``
    (codes: context codes looked up; time: training steps only, batch preparation included)."""
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Real) or not 0 < epochs < math.inf:
        raise ValueError(f"train_general: epochs must be a positive number; got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"train_general: batch_size must be a positive int; got {batch_size!r}")
    if model.codes.optimizer is None:  # (the context table has the same optimizer)
        raise ValueError("train_general: the model's tables have no fused optimizer (optimizer=None gives plain "
                         "gradients, which this loop would never apply): train them in a loop of your own")
    frozen = [name for name, m in (("codes", model.codes), ("context", model.context))
              if not any(p.requires_grad for p in m.parameters())]
    if frozen:  # trained nothing, silently (bug hunt)
        raise ValueError(f"train_general: the model's {' and '.join(frozen)} tables are frozen (requires_grad "
                         "False; a CodeOutcomeModel built on this embedding freezes its codes): unfreeze them "
                         "with requires_grad_(True) to train them")
    dev = model.bases.device
    model.set_noise([claims.code_counts(d) for d in claims.domains])
    visits = np.flatnonzero(claims.visit_sizes() >= 2)
    if visits.size == 0:
        raise ValueError("train_general: no visit of the claims has at least 2 codes (a context and a target)")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    steps = max(1, int(math.ceil(epochs * visits.size / batch_size)))
    order = np.concatenate([rng.permutation(visits) for _ in range(int(math.ceil(epochs)) + 1)])
    nf = len(claims.domains)
    losses, codes, t0, last = [], 0, time.perf_counter(), time.perf_counter()
    for s in range(steps):
        ids = order[s * batch_size: (s + 1) * batch_size]
        idx, off = claims.visit_bags(ids, dev)
        psw, tgt = cbow_batch(idx, off, nf, model.bases, gen)
        neg = model.sample_negatives(ids.size, gen)
        loss = model(idx, off, psw, tgt, neg)
        loss.backward()
        model.update()
        codes += idx.numel()
        losses.append(float(loss.detach()))
        now = time.perf_counter()
        if progress is not None and (now - last > 2.0 or s == steps - 1):
            progress(f"general embedding: step {s + 1}/{steps}, loss {np.mean(losses[-20:]):.3f}, "
                     f"{codes / (now - t0):,.0f} codes/s")
            last = now
        if max_seconds is not None and now - t0 > max_seconds:
            break
    secs = time.perf_counter() - t0
    k = max(1, min(20, len(losses) // 5))
    return {"steps": len(losses), "codes": codes, "seconds": secs, "codes_per_s": codes / secs,
            "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:]))}


# ---------------------------------------------------------------- the prediction task


class CodeOutcomeModel(nn.Module):
    """A patient-level outcome from the patient's pooled codes, in one of the paper's three variants.

    Args:
        variant: ``"general"`` (``general``'s tables, frozen), ``"task"`` (new task-specific tables,
            trained with the head) or ``"super"`` (both: the same codes looked up in each, the pooled
            outputs concatenated).
        general: the general embedding's :class:`CodeEmbedding` (``GeneralCodeEmbedding.codes``);
            required by ``"general"`` and ``"super"``. Frozen: its lookups run without gradients (mean
            pooling) and its tables' ``requires_grad`` is cleared.
        sizes, dim: of the task tables (default: ``general``'s).
        domains: the task tables' domain names, in table order (used when ``general`` is None).
        optimizer, lr, weight_decay, impl, backend, device, seed: of the task tables
            (:class:`CodeEmbedding`; ``optimizer=None`` gives them ordinary gradients).

    ``features(indices, offsets)`` → ``[B, F]`` (``F = T·D`` for ``general``/``task``, ``2·T·D`` for
    ``super``); ``forward`` → logits ``[B]`` (a batch-normalised linear head). The head's parameters
    (``head_parameters()``) are for an ordinary torch optimizer.
    """

    def __init__(self, variant: str, general: CodeEmbedding | None = None, sizes: Sequence[int] | None = None,
                 dim: int | None = None, domains: Sequence[str] = ("dx", "px", "rx"),
                 optimizer: str | None = "rowwise_adagrad", lr: float = 0.05, weight_decay: float = 0.0,
                 impl: str = "kfuse", backend: str = "auto", device: torch.device | str | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
        if variant != "task" and general is None:
            raise ValueError(f"variant {variant!r} needs the general embedding (general=...)")
        self.variant = variant
        self.general = general if variant != "task" else None
        if self.general is not None:
            self.general.requires_grad_(False)  # its tables, and a fused optimizer's backward hook
        self.task: CodeEmbedding | None = None
        if variant != "general":
            sizes = sizes if sizes is not None else general.sizes
            dim = dim if dim is not None else general.dim
            domains = general.domains if general is not None else domains
            self.task = CodeEmbedding(sizes, dim, domains, mode="mean", optimizer=optimizer, lr=lr,
                                      weight_decay=weight_decay, impl=impl, backend=backend, device=device,
                                      seed=seed)
        width = sum(m.out_dim for m in (self.general, self.task) if m is not None)
        self.norm = nn.BatchNorm1d(width, affine=False, device=device)
        # The head's initialisation from seed, not from torch's global RNG: built on the CPU with the CPU
        # generator seeded inside fork_rng (torch.manual_seed would also reseed every CUDA generator).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            self.head = nn.Linear(width, 1).to(device)

    def head_parameters(self) -> list[nn.Parameter]:
        """The outcome head's parameters, for a torch optimizer (the task tables update themselves)."""
        return list(self.head.parameters())

    def _general_features(self, indices: Tensor, offsets: Tensor) -> Tensor:
        g = self.general
        with torch.no_grad():
            if g.mode == "mean":
                return g(indices, offsets)
            # The general tables pool by weighted sum (CBOW): the mean is a sum with weights 1/len.
            lens = offsets[1:] - offsets[:-1]
            wdt = acc_dtype(g.weights[0].dtype)  # float64 tables take float64 weights (float32 for the others)
            inv = torch.where(lens > 0, 1.0 / lens.clamp(min=1).to(wdt), torch.zeros((), dtype=wdt, device=lens.device))
            bag = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens,
                                          output_size=indices.numel())
            return g(indices, offsets, inv[bag])

    def features(self, indices: Tensor, offsets: Tensor) -> Tensor:
        """``[B, F]``: the pooled codes (``indices``, ``offsets [T·B + 1]`` as :class:`CodeEmbedding`)."""
        parts = []
        if self.general is not None:
            parts.append(self._general_features(indices, offsets))
        if self.task is not None:
            parts.append(self.task(indices, offsets))
        return torch.cat(parts, dim=1)

    def forward(self, indices: Tensor, offsets: Tensor, general_features: Tensor | None = None) -> Tensor:
        """Logits ``[B]``. ``general_features [B, T·D]``: the general half, when already computed (the
        general tables are frozen, so a training loop may pool them once: :func:`train_outcome` does)."""
        if general_features is None or self.general is None:
            feats = self.features(indices, offsets)
        elif self.task is None:
            feats = general_features
        else:
            feats = torch.cat([general_features, self.task(indices, offsets)], dim=1)
        return self.head(self.norm(feats)).squeeze(1)

    @torch.no_grad()
    def general_features(self, claims: Claims, patients: np.ndarray, batch_size: int = 4096) -> Tensor | None:
        """``[len(patients), T·D]``: the general tables' mean-pooled codes of each patient (None for the
        ``"task"`` variant)."""
        if self.general is None:
            return None
        dev = self.head.weight.device
        out = []
        for s in range(0, len(patients), batch_size):
            idx, off = claims.patient_bags(np.asarray(patients)[s: s + batch_size], dev)
            out.append(self._general_features(idx, off))
        return torch.cat(out) if out else torch.zeros(0, self.general.out_dim, device=dev)

    def update(self) -> None:
        """After a backward: the task tables' optimizer step (the general ones are frozen)."""
        if self.task is not None:
            self.task.update()


def train_outcome(model: CodeOutcomeModel, claims: Claims, patients: np.ndarray, epochs: int = 3, batch_size: int = 256,
                  head_lr: float = 1e-2, seed: int = 0, progress: Callable[[str], None] | None = None) -> dict:
    """Trains ``model`` on ``patients`` of ``claims`` (their ``labels``) with binary cross-entropy: the
    head by Adam (``head_lr``), the task tables by their fused optimizer. Returns ``{"steps", "seconds",
    "loss_last"}``."""
    if claims.labels is None:
        raise ValueError("train_outcome: the claims have no labels")
    if model.task is not None and model.task.optimizer is None:
        raise ValueError("train_outcome: the task tables have no fused optimizer (optimizer=None gives plain "
                         "gradients, which this loop would never apply): train them in a loop of your own")
    for name, v, lo in (("epochs", epochs, 0), ("batch_size", batch_size, 2)):  # (batch norm needs two rows)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
            raise ValueError(f"train_outcome: {name} must be an int >= {lo}; got {v!r}")
    dev = model.head.weight.device
    rng = np.random.default_rng(seed)
    # Adam's default eps (1e-8) is 0 in float16: a head made .half() divided 0 by 0 from its second step on.
    eps = max(1e-8, torch.finfo(model.head.weight.dtype).tiny)
    opt = torch.optim.Adam(model.head_parameters(), lr=head_lr, eps=eps)
    labels = torch.as_tensor(claims.labels, dtype=torch.float32)
    model.train()
    t0, losses, steps = time.perf_counter(), [], 0
    patients = np.asarray(patients)
    # The general tables are frozen: pool them once, not every epoch.
    general = model.general_features(claims, patients)
    where = np.full(claims.num_patients, -1, dtype=np.int64)
    where[patients] = np.arange(patients.size)
    for e in range(epochs):
        order = rng.permutation(patients)
        for s in range(0, order.size, batch_size):
            ids = order[s: s + batch_size]
            if ids.size < 2:  # batch norm needs two
                continue
            gf = None if general is None else general[torch.as_tensor(where[ids], device=dev)]
            if model.task is None:
                idx = off = None
            else:
                idx, off = claims.patient_bags(ids, dev)
            loss = F.binary_cross_entropy_with_logits(model(idx, off, gf), labels[ids].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.update()
            losses.append(float(loss.detach()))
            steps += 1
        if progress is not None:
            progress(f"{model.variant}: epoch {e + 1}/{epochs}, loss {np.mean(losses[-20:]):.3f}")
    return {"steps": steps, "seconds": time.perf_counter() - t0,
            "loss_last": float(np.mean(losses[-20:])) if losses else math.nan}


@torch.no_grad()
def predict_outcome(model: CodeOutcomeModel, claims: Claims, patients: np.ndarray,
                    batch_size: int = 2048) -> np.ndarray:
    """``[len(patients)]``: predicted probabilities."""
    was_training = model.training
    model.eval()
    dev = model.head.weight.device
    out = []
    try:  # the caller's mode back on an error too (a bad patient id left a training model in eval)
        for s in range(0, len(patients), batch_size):
            idx, off = claims.patient_bags(np.asarray(patients)[s: s + batch_size], dev)
            out.append(torch.sigmoid(model(idx, off)).cpu())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros(0)
    p = torch.cat(out)
    return (p.float() if p.dtype == torch.bfloat16 else p).numpy()  # (numpy has no bfloat16)


# ---------------------------------------------------------------- evaluation and export


def neighbour_agreement(vectors: Tensor, categories: np.ndarray, eligible: np.ndarray, k: int = 5
                        ) -> tuple[float, float]:
    """How often a code's ``k`` nearest neighbours (cosine, among the ``eligible`` rows with a category,
    itself excluded) share its category, against chance (a random other eligible code sharing it).

    ``vectors [n, D]``, ``categories [n]`` (−1: none), ``eligible``: row numbers. Returns
    ``(fraction, chance)``.
    """
    rows = np.asarray(eligible)
    rows = rows[categories[rows] >= 0]
    m = rows.size
    if m < k + 2:
        raise ValueError(f"neighbour_agreement: {m} eligible rows with a category; need at least {k + 2}")
    e = F.normalize(vectors[torch.as_tensor(rows)].float(), dim=1)
    cat = torch.as_tensor(categories[rows])
    hits = 0
    for s in range(0, m, 2048):  # blocks of rows: [2048, m] similarities at a time
        sim = e[s: s + 2048] @ e.T
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -float("inf")
        nn_idx = sim.topk(k, dim=1).indices
        hits += int((cat[nn_idx] == cat[s: s + 2048].unsqueeze(1)).sum())
    counts = np.bincount(categories[rows])
    chance = float(np.mean((counts[categories[rows]] - 1) / (m - 1)))
    return hits / (m * k), chance


def export_vectors(embedding: CodeEmbedding, vocab: CodeVocab, path: str | os.PathLike,
                   fmt: str = "word2vec") -> list[Path]:
    """Writes every code's vector of ``embedding`` (keys ``"<domain>:<code>"``, e.g. ``dx:I10``).

    ``fmt="word2vec"``: word2vec text (``"<count> <dim>"``, then ``key v1 … vD`` per line; gensim's
    ``KeyedVectors.load_word2vec_format`` reads it). ``fmt="npy"``: ``<path>.npy`` ``[N, D]`` float32 and
    ``<path>.index.tsv`` (``row, domain, code, description``). Returns the files written.
    """
    path = Path(path)
    keys = [f"{d}:{c}" for d in embedding.domains for c in vocab.codes[d]]
    mat = torch.cat([embedding.vectors(d) for d in embedding.domains]).numpy().astype(np.float32)
    if mat.shape[0] != len(keys):
        raise ValueError(f"export_vectors: the tables have {mat.shape[0]} rows; the vocabulary {len(keys)} codes")
    if fmt == "word2vec":
        spaced = [k for k in keys if len(k.split()) != 1]
        if spaced:  # the format splits a line at spaces: such a key would not read back (here, or in gensim)
            raise ValueError(f"export_vectors: word2vec text cannot hold keys with spaces ({len(spaced)}, e.g. "
                             f"{spaced[0]!r}); use fmt='npy'")
        with replaced(path, "w", encoding="utf-8") as f:
            f.write(f"{mat.shape[0]} {mat.shape[1]}\n")
            for key, row in zip(keys, mat.tolist(), strict=True):  # repr: the shortest text that reads back exactly
                f.write(key + " " + " ".join(map(repr, row)) + "\n")
        return [path]
    if fmt == "npy":
        # Suffixes appended, not substituted: "emb.seed1" and "emb.seed2" must not both write "emb.npy".
        base = str(path.with_suffix("") if path.suffix == ".npy" else path)
        npy, tsv = Path(base + ".npy"), Path(base + ".index.tsv")
        broken = [k for k in keys if any(ch in k for ch in "\t\n\r")]
        if broken:  # the index is tab-separated lines: such a code would read back as another (files hunt)
            raise ValueError(f"export_vectors: the npy index cannot hold codes with tabs or line breaks "
                             f"({len(broken)}, e.g. {broken[0]!r})")
        lines = [f"{r}\t{d}\t{c}\t{' '.join(desc.split())}\n" for r, (d, c, desc) in enumerate(
            (d, c, desc) for d in embedding.domains
            for c, desc in zip(vocab.codes[d], vocab.descriptions[d], strict=True))]  # (checked before writing)
        with replaced(npy, "wb") as f:
            np.save(f, mat)
        with replaced(tsv, "w", encoding="utf-8") as f:
            f.write("row\tdomain\tcode\tdescription\n")
            f.writelines(lines)
        return [npy, tsv]
    raise ValueError(f"fmt must be 'word2vec' or 'npy'; got {fmt!r}")


def load_vectors(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Reads what :func:`export_vectors` wrote: ``(keys, vectors [N, D] float32)``. A ``.npy`` path (or its
    ``.index.tsv``) reads the npy format; anything else, word2vec text."""
    path = Path(path)
    if path.suffix in (".npy", ".tsv"):
        base = str(path).removesuffix(".index.tsv").removesuffix(".npy")
        mat = np.load(base + ".npy")
        if mat.ndim != 2 or mat.dtype != np.float32:
            raise ValueError(f"{base}.npy: expected a [N, D] float32 array; got {mat.dtype} {list(mat.shape)}")
        keys = []
        with open(base + ".index.tsv", encoding="utf-8", newline="\n") as f:
            next(f, None)
            for i, line in enumerate(f):
                p = line.rstrip("\n").split("\t")
                if len(p) != 4 or p[0] != str(i):
                    raise ValueError(f"{base}.index.tsv:{i + 2}: expected row {i}'s 'row, domain, code, "
                                     f"description' (4 tab-separated fields); got {line[:80]!r}")
                keys.append(f"{p[1]}:{p[2]}")
        if len(keys) != mat.shape[0]:  # (a cut index gave fewer keys than rows, silently: files hunt)
            raise ValueError(f"{base}.index.tsv: {len(keys)} codes for the {mat.shape[0]} rows of {base}.npy")
        return keys, mat
    with open(path, encoding="utf-8") as f:
        header = f.readline().split()
        if len(header) != 2 or not all(x.isascii() and x.isdigit() for x in header):
            raise ValueError(f"{path}:1: expected the word2vec header '<count> <dim>' (two integers >= 0); got "
                             f"{' '.join(header)[:80]!r}")
        n, d = (int(x) for x in header)
        keys, rows = [], np.empty((n, d), dtype=np.float32)
        for i, line in enumerate(f):
            parts = line.rstrip("\n").split(" ")
            if i >= n or len(parts) != d + 1:
                raise ValueError(f"{path}:{i + 2}: expected {n} lines of a key and {d} values (the header's "
                                 f"'{n} {d}'); got {'another line' if i >= n else f'{len(parts)} fields'}")
            keys.append(parts[0])
            try:
                rows[i] = np.asarray(parts[1:], dtype=np.float32)
            except ValueError as e:
                raise ValueError(f"{path}:{i + 2}: {e}") from None
    if len(keys) != n:  # (np.empty's rows past the end were returned as vectors)
        raise ValueError(f"{path}: the header says {n} vectors; the file has {len(keys)}")
    return keys, rows
