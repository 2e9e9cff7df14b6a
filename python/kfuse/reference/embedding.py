"""Multi-table embedding bags, the definition.

Layout (FBGEMM/TorchRec): ``T`` tables ``weights[t] [rows_t, dim_t]`` (one dtype); ``F`` features,
feature ``f`` looked up in table ``feature_table[f]``; flat ``indices [N]`` (int32 or int64) and
``offsets [F·B + 1]`` (same dtype): bag ``b`` of feature ``f`` is
``indices[offsets[f·B + b] : offsets[f·B + b + 1]]``. Output ``[B, Σ_f dim_{table(f)}]``, features
concatenated in order, in the tables' dtype. Pooling: ``SUM`` (optionally weighted by
``per_sample_weights [N]``) or ``MEAN`` (over the bag's non-padding indices; an empty bag gives
zeros). An index equal to its table's ``padding_idx`` is skipped (no contribution, not counted, no
gradient). Each feature's output is ``torch.nn.functional.embedding_bag`` of its slice, computed in
float64 (``compute_dtype``) and cast to the tables' dtype.

Also the definitions the kernels are tested against: the row-sparse gradient (:func:`sparse_grad`),
the fused optimizers' per-row updates (:func:`sgd_update`, :func:`rowwise_adagrad_update`,
:func:`adam_update`) and their stochastic rounding (:func:`stochastic_round`). Written for clarity,
not speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Pooling modes, ATen's numbering (``max`` = 2 is not supported by kfuse).
SUM, MEAN = 0, 1
POOLINGS = {"sum": SUM, "mean": MEAN}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for tables of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def out_columns(dims: list[int], feature_table: list[int]) -> list[int]:
    """Column offsets of the features in an output row, plus the total width: ``[F + 1]``."""
    cols = [0]
    for t in feature_table:
        cols.append(cols[-1] + dims[t])
    return cols


def _feature_slice(indices: Tensor, offsets: Tensor, f: int, batch: int) -> tuple[Tensor, Tensor]:
    """Feature ``f``'s indices and its ``B + 1`` offsets rebased to 0 (int64). One feature's are the whole
    (offsets from 0 to len(indices)): not sliced by their values, which a ``vmap`` over offsets cannot read."""
    if offsets.numel() == batch + 1:
        return indices.long(), offsets.long()
    offs = offsets[f * batch: (f + 1) * batch + 1].long()
    return indices[offs[0]: offs[-1]].long(), offs - offs[0]


def multi_embedding_bag_reference(weights: list[Tensor], indices: Tensor, offsets: Tensor, feature_table: list[int],
                                  pooling: int = SUM, per_sample_weights: Tensor | None = None,
                                  padding_idx: list[int] | None = None,
                                  compute_dtype: torch.dtype = torch.float64) -> Tensor:
    """Pooled lookups of every feature, concatenated: ``[B, Σ dims]`` in the tables' dtype, with
    ``B = (len(offsets) − 1) / F``; offsets run from 0 to ``len(indices)``, as the ops check. Differentiable
    (plain autograd through ``embedding_bag`` in ``compute_dtype``) w.r.t. the tables and ``per_sample_weights``."""
    nf = len(feature_table)
    batch = (offsets.numel() - 1) // nf
    pads = padding_idx or [-1] * len(weights)
    outs = []
    for f, t in enumerate(feature_table):
        idx, offs = _feature_slice(indices, offsets, f, batch)
        psw = None
        if per_sample_weights is not None:
            lo, hi = (0, len(indices)) if nf == 1 else (int(offsets[f * batch]), int(offsets[(f + 1) * batch]))
            psw = per_sample_weights[lo:hi].to(compute_dtype)
        outs.append(F.embedding_bag(idx, weights[t].to(compute_dtype), offs, mode=("sum", "mean")[pooling],
                                    per_sample_weights=psw, include_last_offset=True,
                                    padding_idx=None if pads[t] < 0 else pads[t]))
    return torch.cat(outs, dim=1).to(weights[0].dtype)


def table_occurrences(indices: Tensor, offsets: Tensor, feature_table: list[int], table: int,
                      padding_idx: int = -1) -> Tensor:
    """Flat positions ``i`` (int64, increasing) of the indices that look up ``table`` and are not padding."""
    nf = len(feature_table)
    batch = (offsets.numel() - 1) // nf
    pos = []
    for f, t in enumerate(feature_table):
        if t == table:
            lo, hi = int(offsets[f * batch]), int(offsets[(f + 1) * batch])
            p = torch.arange(lo, hi)
            pos.append(p[indices[lo:hi].cpu() != padding_idx] if padding_idx >= 0 else p)
    return torch.cat(pos) if pos else torch.zeros(0, dtype=torch.int64)


def multi_embedding_bag_backward_reference(grad_out: Tensor, weights: list[Tensor], indices: Tensor, offsets: Tensor,
                                           feature_table: list[int], pooling: int = SUM,
                                           per_sample_weights: Tensor | None = None,
                                           padding_idx: list[int] | None = None,
                                           compute_dtype: torch.dtype = torch.float64
                                           ) -> tuple[list[Tensor], Tensor | None]:
    """The gradients of :func:`multi_embedding_bag_reference`, written out (no autograd, so it also runs
    inside a registered op): dense ``[rows_t, dim_t]`` per table and ``[N]`` for ``per_sample_weights``
    (None without them), in ``compute_dtype``. Occurrence ``i`` of feature ``f`` in bag ``b`` adds
    ``scale_i · grad_out[b, cols(f)]`` to its row (``scale_i`` = its weight, ``1/count(b)`` for mean, or
    1); padding occurrences add nothing."""
    nf = len(feature_table)
    batch = (offsets.numel() - 1) // nf
    pads = padding_idx or [-1] * len(weights)
    cols = out_columns([w.shape[1] for w in weights], feature_table)
    go = grad_out.to(compute_dtype)
    grads = [torch.zeros(w.shape, dtype=compute_dtype, device=w.device) for w in weights]
    g_psw = None if per_sample_weights is None else torch.zeros(indices.numel(), dtype=compute_dtype,
                                                               device=indices.device)
    off = offsets.long()
    for f, t in enumerate(feature_table):
        lo, hi = int(off[f * batch]), int(off[(f + 1) * batch])
        idx = indices[lo:hi].long()
        bag = torch.repeat_interleave(torch.arange(batch, device=idx.device), off[f * batch + 1: (f + 1) * batch + 1]
                                      - off[f * batch: (f + 1) * batch])
        keep = idx != pads[t] if pads[t] >= 0 else torch.ones_like(idx, dtype=torch.bool)
        rows = go[bag, cols[f]: cols[f + 1]]  # [n, dim]
        if pooling == MEAN:
            count = torch.zeros(batch, dtype=compute_dtype, device=idx.device)
            count.index_add_(0, bag, keep.to(compute_dtype))
            scale = 1.0 / count.clamp(min=1)[bag]
        elif per_sample_weights is not None:
            scale = per_sample_weights[lo:hi].to(compute_dtype)
            g_psw[lo:hi] = torch.where(keep, (rows * weights[t][idx].to(compute_dtype)).sum(1), 0.0)
        else:
            scale = torch.ones(idx.numel(), dtype=compute_dtype, device=idx.device)
        grads[t].index_add_(0, idx[keep], (rows * scale.unsqueeze(1))[keep])
    return grads, g_psw


def sparse_grad(dense_grad: Tensor, indices: Tensor, offsets: Tensor, feature_table: list[int], table: int,
                padding_idx: int = -1) -> tuple[Tensor, Tensor]:
    """The row-sparse form of table ``table``'s gradient: (its unique looked-up, non-padding rows,
    ascending, int64 ``[U]``; ``dense_grad[rows]`` ``[U, dim]``)."""
    pos = table_occurrences(indices, offsets, feature_table, table, padding_idx)
    rows = torch.unique(indices.cpu()[pos].long())
    return rows, dense_grad[rows.to(dense_grad.device)]


# ---------------------------------------------------------------- fused optimizers, per unique row
# ``rows [U]`` unique, ``g [U, dim]`` their summed gradients (float32, float64 for float64 tables).
# Each returns the rows' new float values ``[U, dim]`` (before rounding to the table dtype) and
# updates the states in place.


def sgd_update(w: Tensor, g: Tensor, lr: float, weight_decay: float = 0.0) -> Tensor:
    """``w − lr·(g + wd·w)`` for the rows' values ``w [U, dim]`` (float)."""
    return w - lr * (g + weight_decay * w)


def rowwise_adagrad_update(w: Tensor, g: Tensor, state: Tensor, lr: float, eps: float,
                           weight_decay: float = 0.0) -> Tensor:
    """FBGEMM's exact row-wise Adagrad: ``g' = g + wd·w``; ``state += mean(g'², dim)`` (``state [U]``,
    updated in place); ``w − lr·g' / (sqrt(state) + eps)``."""
    g = g + weight_decay * w
    state += (g * g).mean(dim=1).to(state.dtype)
    return w - lr * g / (state.to(w.dtype).sqrt() + eps).unsqueeze(1)


def adam_update(w: Tensor, g: Tensor, m: Tensor, v: Tensor, lr: float, beta1: float, beta2: float, eps: float,
                step: int, weight_decay: float = 0.0) -> Tensor:
    """Adam on the rows seen, global ``step`` ≥ 1: ``w − lr·(m̂ / (√v̂ + eps) + weight_decay·w)`` with the
    bias-corrected moments m̂, v̂, i.e. ``torch.optim.AdamW``'s step (``torch.optim.Adam``'s when
    ``weight_decay`` is 0) on those rows; ``m, v [U, dim]`` updated in place. ``torch.optim.SparseAdam``
    (torch's rows-seen Adam) adds eps before the bias correction,
    ``lr·√(1−β₂ᵗ)/(1−β₁ᵗ)·m/(√v + eps)``: the two differ where √v̂ is not large against eps (tiny
    gradients)."""
    m.mul_(beta1).add_((1 - beta1) * g.to(m.dtype))
    v.mul_(beta2).add_((1 - beta2) * (g * g).to(v.dtype))
    m_hat = m.to(w.dtype) / (1 - beta1 ** step)
    v_hat = v.to(w.dtype) / (1 - beta2 ** step)
    return w - lr * (m_hat / (v_hat.sqrt() + eps) + weight_decay * w)


# ---------------------------------------------------------------- stochastic rounding
_M32 = 0xFFFFFFFF


def _mix(x: Tensor) -> Tensor:
    """lowbias32 (uint32 arithmetic, here on int64 masked to 32 bits)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0xD35A2D97) & _M32
    return x ^ (x >> 15)


def rounding_bits(seed: int, step: int, table: int, rows: Tensor, cols: Tensor) -> Tensor:
    """``u = mix(mix(mix(mix(mix(seed) ^ step) ^ table) ^ row) ^ col)`` (int64 holding uint32) for every
    (row, col) of ``rows [U, 1]`` × ``cols [1, dim]``."""
    u = _mix(torch.tensor(seed & _M32, dtype=torch.int64))
    u = _mix(u ^ (step & _M32))
    u = _mix(u ^ (table & _M32))
    u = _mix(u ^ (rows.long() & _M32))
    return _mix(u ^ (cols.long() & _M32))


def stochastic_round(y: Tensor, dtype: torch.dtype, u: Tensor) -> Tensor:
    """Float32 ``y`` rounded to ``dtype`` (float16 or bfloat16) stochastically with the random bits
    ``u`` (uint32 in int64, broadcastable to ``y``): the magnitude ``lo ≤ |y|`` or the next one up,
    ``hi``, with probability ``p = (|y| − |lo|)/(|hi| − |lo|)`` of ``hi``, chosen by
    ``r = (u >> 8)·2⁻²⁴ < p``. NaN stays NaN. Bit-exact definition shared by every backend."""
    y = y.float()
    n = y.to(dtype)
    mag = n.view(torch.int16).int() & 0x7FFF
    mag = torch.where(n.float().abs() > y.abs(), mag - 1, mag)
    sign = torch.where(torch.signbit(y), 0x8000, 0)

    def value(m: Tensor) -> Tensor:
        bits = (m | sign).to(torch.int32)
        return (bits - ((bits & 0x8000) << 1)).to(torch.int16).view(dtype)  # as int16 two's complement

    lo, hi = value(mag), value(mag + 1)
    alo, ahi = lo.float().abs(), hi.float().abs()
    p = torch.where(ahi > alo, (y.abs() - alo) / (ahi - alo), torch.zeros_like(y))
    r = (u >> 8).float() * 2.0**-24
    out = torch.where(r < p, hi, lo)
    return torch.where(torch.isnan(y), n, out)
