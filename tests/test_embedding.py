"""Tests of the embedding family: kfuse.embedding_bag / multi_embedding_bag, their gradients, the
modules, and the fused optimizers, on every backend this machine runs, against
torch.nn.functional.embedding_bag in float64 (one call per feature); then the C++ kernels and the
Triton kernels directly (bit-level checks of the fused optimizers, bad input, the error flag)."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import subprocess
import sys
import textwrap
import warnings

import gloo
import numpy as np
import pytest
import sm90
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from interrupts import interrupt_each_point
from tolerances import assert_close

import kfuse
from kfuse import _backends
from kfuse.nn.embedding import MultiTableEmbeddingBag, _row_updates
from kfuse.ops import embedding as E
from kfuse.reference.embedding import (
    acc_dtype,
    adam_update,
    multi_embedding_bag_backward_reference,
    multi_embedding_bag_reference,
    rounding_bits,
    rowwise_adagrad_update,
    sgd_update,
    sparse_grad,
    stochastic_round,
)
from kfuse.triton_kernels import embedding as te

#: (backend, device): the Triton kernels run under the interpreter on CPU-only machines.
_PAIRS = [("reference", "cpu", ()), ("cpu", "cpu", ()), ("triton", "cpu", (pytest.mark.interpret,)),
          ("triton", "cuda", (pytest.mark.cuda,))]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _id(backend: str, device: str) -> str:
    return backend if backend != "triton" else f"triton-{'interp' if device == 'cpu' else 'cuda'}"


def supported(backend: str, device: str, dtype: torch.dtype) -> bool:
    """Triton has no float64 kernels, and its interpreter gets bfloat16 wrong on CPU."""
    return backend != "triton" or (dtype != torch.float64 and (device == "cuda" or dtype != torch.bfloat16))


def backends(*dtypes: torch.dtype) -> list:
    """(backend, device) params that support every one of ``dtypes`` (default: float32)."""
    dtypes = dtypes or (torch.float32,)
    return [pytest.param(b, d, id=_id(b, d), marks=m) for b, d, m in _PAIRS
            if all(supported(b, d, t) for t in dtypes)]


def backend_dtypes(dtypes) -> list:
    """(backend, device, dtype) params: every supported combination."""
    return [pytest.param(b, d, t, id=f"{_id(b, d)}-{str(t)[6:]}", marks=m) for b, d, m in _PAIRS for t in dtypes
            if supported(b, d, t)]


def zipf_indices(n: int, rows: int, gen: torch.Generator, a: float = 1.2) -> torch.Tensor:
    """``n`` indices in ``[0, rows)``, Zipf-like (rank ``k`` with weight ``1/k^a``), randomly permuted ranks."""
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    p = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** a
    ranks = torch.multinomial(p, n, replacement=True, generator=gen)
    return torch.randperm(rows, generator=gen)[ranks]


def make_bags(tables, feature_table, batch, gen, max_bag=7, empty=0.2, itype=torch.int64, padding=None):
    """Random jagged input: (indices [N], offsets [F·B + 1]) with Zipf duplicates, empty bags and, where a
    table has a padding row, some padding indices."""
    idx, lens = [], []
    for t in feature_table:
        rows = tables[t][0]
        for _ in range(batch):
            n = 0 if torch.rand((), generator=gen) < empty else int(torch.randint(1, max_bag + 1, (), generator=gen))
            bag = zipf_indices(n, rows, gen)
            if padding is not None and padding[t] is not None and n:
                bag[torch.rand(n, generator=gen) < 0.2] = padding[t] % rows
            idx.append(bag)
            lens.append(n)
    offsets = torch.zeros(len(lens) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lens), 0)
    return torch.cat(idx).to(itype), offsets.to(itype)


def per_feature_torch(weights, indices, offsets, feature_table, mode, psw=None, padding=None):
    """The per-feature loop of torch.nn.functional.embedding_bag in float64 (differentiable)."""
    nf = len(feature_table)
    batch = (offsets.numel() - 1) // nf
    outs = []
    for f, t in enumerate(feature_table):
        off = offsets[f * batch: (f + 1) * batch + 1].long()
        lo, hi = int(off[0]), int(off[-1])
        outs.append(F.embedding_bag(indices[lo:hi].long(), weights[t], off - lo, mode=mode,
                                    per_sample_weights=None if psw is None else psw[lo:hi],
                                    include_last_offset=True,
                                    padding_idx=None if padding is None or padding[t] is None else padding[t]))
    return torch.cat(outs, 1)


def _tables(dtype, dims=(7, 1, 33)):
    return [(40, dims[0]), (25, dims[1]), (60, dims[2])]


@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtypes(DTYPES))
@pytest.mark.parametrize("mode", ["sum", "mean", "weighted"])
@pytest.mark.parametrize("itype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_multi_table_matches_torch(backend, device, dtype, mode, itype, seed):
    gen = torch.Generator().manual_seed(seed)
    tables, ft = _tables(dtype), [0, 1, 2, 0]  # features 0 and 3 share table 0
    padding = [3, None, -1]
    weights = [torch.randn(r, d, generator=gen).to(device, dtype).requires_grad_() for r, d in tables]
    indices, offsets = make_bags(tables, ft, 9, gen, itype=itype, padding=padding)
    psw = None
    if mode == "weighted":  # in the tables' dtype, as torch requires
        psw = torch.randn(indices.numel(), generator=gen).to(device, dtype).requires_grad_()
    pool = "sum" if mode == "weighted" else mode
    out = kfuse.multi_embedding_bag(weights, indices.to(device), offsets.to(device), ft, pool, psw, padding,
                                    backend=backend)
    ref_w = [w.detach().cpu().double().requires_grad_() for w in weights]
    ref_psw = None if psw is None else psw.detach().cpu().double().requires_grad_()
    ref = per_feature_torch(ref_w, indices, offsets, ft, pool, ref_psw, padding)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, "forward")
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(grad.to(device))
    ref.backward(grad.double())
    for t, (w, r) in enumerate(zip(weights, ref_w, strict=True)):
        assert w.grad.dtype == dtype
        assert_close(w.grad, r.grad, dtype, f"grad of table {t}")
    if psw is not None:
        assert psw.grad.dtype == dtype
        assert_close(psw.grad, ref_psw.grad, dtype, "grad of per_sample_weights")


@pytest.mark.parametrize(("backend", "device"), backends(torch.float64))
@pytest.mark.parametrize("case", ["offsets", "include_last", "2d", "psw", "padding", "empty", "neg_padding",
                                  "mixed_ints"])
def test_single_table_matches_functional(backend, device, case, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(30, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = zipf_indices(24, 30, gen)
    off = torch.tensor([0, 3, 3, 10, 17])
    kw: dict = {"mode": "mean"}
    args: tuple = (idx, w, off)
    if case == "include_last":
        args, kw = (idx, w, torch.cat([off, torch.tensor([24])])), {"mode": "sum", "include_last_offset": True}
    elif case == "2d":
        args = (idx.view(6, 4), w)
    elif case == "psw":
        kw = {"mode": "sum", "per_sample_weights": torch.randn(24, generator=gen, dtype=torch.float64)}
    elif case == "padding":
        kw = {"mode": "mean", "padding_idx": int(idx[0])}
    elif case == "neg_padding":
        kw = {"mode": "sum", "padding_idx": -30 + int(idx[1])}
    elif case == "empty":
        args = (idx[:0], w, torch.zeros(4, dtype=torch.int64))
    elif case == "mixed_ints":  # int32 input, int64 offsets: accepted, as by torch
        args = (idx.int(), w, off)
    got = kfuse.embedding_bag(*args, **kw, backend=backend)
    expected = F.embedding_bag(*args, **kw)
    assert_close(got, expected, torch.float64, case)
    g = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    (gw,) = torch.autograd.grad(got, w, g)
    (ew,) = torch.autograd.grad(expected, w, g)
    assert_close(gw, ew, torch.float64, f"{case}: grad")


@pytest.mark.parametrize(("backend", "device"), backends(torch.float64))
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_strided_inputs_match_torch(backend, device, mode, seed):
    """Views of indices, offsets (include_last_offset=True) and per_sample_weights, every other element,
    give torch's forward and gradients (the kernels take flat copies)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(30, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = zipf_indices(24, 30, gen)[::2]
    off = torch.tensor([0, 9, 3, 9, 3, 9, 8, 9, 12])[::2]
    psw_all = torch.randn(24, generator=gen, dtype=torch.float64, requires_grad=True)
    psw = psw_all[::2] if mode == "sum" else None
    assert not (idx.is_contiguous() or off.is_contiguous() or psw_all[::2].is_contiguous())
    kw = dict(mode=mode, per_sample_weights=psw, include_last_offset=True)
    got = kfuse.embedding_bag(idx, w, off, **kw, backend=backend)
    expected = F.embedding_bag(idx, w, off, **kw)
    assert_close(got, expected, torch.float64, "forward")
    g = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    leaves = (w, psw_all) if psw is not None else (w,)
    for a, b, name in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(expected, leaves, g),
                          ("weight", "per_sample_weights"), strict=False):
        assert_close(a, b, torch.float64, f"grad of {name}")


@pytest.mark.parametrize("backend,device", backends())
def test_negated_views_are_read_as_their_values(backend, device):
    """A ``torch._neg_view`` (same values, the negative bit set, which ``.contiguous()`` keeps) as
    per_sample_weights or as the gradient gives the plain tensors' results bit for bit; as a table, whose
    rows the kernels read (and the fused optimizer writes) in place, it is refused by name. The kernels
    read the memory, ``-t``, before (layout hunt, 2026-12-05)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(10, 6, generator=gen).to(device)
    idx, off = torch.tensor([1, 2, 3, 1, 9], device=device), torch.tensor([0, 2, 5], device=device)
    psw = torch.randn(5, generator=gen).to(device)
    g = torch.randn(2, 6, generator=gen).to(device)
    results = []
    for neg in (False, True):
        ww, p = w.clone().requires_grad_(), psw.clone().requires_grad_()
        y = kfuse.multi_embedding_bag([ww], idx, off, per_sample_weights=torch._neg_view(-p) if neg else p,
                                      backend=backend)
        results.append((y, *torch.autograd.grad(y, (ww, p), torch._neg_view(-g) if neg else g)))
    for a, b, name in zip(*results, ("forward", "grad of weights[0]", "grad of per_sample_weights"), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match=r"weights\[0\] is a lazily negated view .* pass weights\[0\].resolve_neg"):
        kfuse.multi_embedding_bag([torch._neg_view(-w)], idx, off, backend=backend)
    with pytest.raises(ValueError, match=r"kfuse.embedding_bag: weight is a lazily negated view"):
        kfuse.embedding_bag(idx, torch._neg_view(-w), off, backend=backend)


class _Table(torch.Tensor):
    pass


def test_one_pass_over_the_tables_takes_ordinary_tables_only():
    """The extension's one pass over the tables (``_C.embedding_tables``: at 32 tables the Python checks, the
    route's and the cache key's per-table reads took ~55 us a call) passes exactly the ordinary tables, with
    the Triton metadata cache's key as the launcher computes it and the first table requiring grad, which
    stands for all in the routing: a gradient for a later table alone still flows."""
    ext = _backends.extension()
    ws = [torch.randn(5, 3), torch.nn.Parameter(torch.randn(7, 3)), torch.randn(4, 2)]
    assert ext.embedding_tables(ws) == (1, te.tables_key_of(ws))
    assert ext.embedding_tables(ws[2:]) == (-1, te.tables_key_of(ws[2:]))
    w = ws[0]
    others = {
        "subclass": [w, w.as_subclass(_Table)], "negated view": [w, torch._neg_view(w)],
        "not contiguous": [w, torch.randn(3, 5).t()], "1-D": [torch.randn(5)], "other dtype": [w, w.double()],
        "other device": [w, torch.empty(5, 3, device="meta")], "meta": [torch.empty(5, 3, device="meta")],
        "no column": [torch.randn(5, 0)], "sparse": [w.to_sparse()], "empty": [],
    }
    for why, tables in others.items():
        assert ext.embedding_tables(tables) is None, why
    seen = []
    torch.func.grad(lambda t: seen.append(ext.embedding_tables([t])) or t.sum())(w)
    torch.func.vmap(lambda t: seen.append(ext.embedding_tables([t])) or t)(w.view(5, 3, 1))
    assert seen == [None, None], "functorch wrappers"
    # Only the last table requires grad: the call must still record autograd, for it alone.
    frozen, trained = torch.randn(6, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    idx, off = torch.tensor([1, 5, 2, 8]), torch.tensor([0, 2, 3, 4, 4])  # 2 features x 2 bags
    for backend in ("cpu", "reference"):
        t = trained.clone().requires_grad_()
        y = kfuse.multi_embedding_bag([frozen, t], idx, off, backend=backend)
        (g,) = torch.autograd.grad(y.square().sum(), t)
        t2 = trained.clone().requires_grad_()
        yr = torch.cat([F.embedding_bag(idx[:3], frozen, off[:2], mode="sum"),
                        F.embedding_bag(idx[3:], t2, torch.tensor([0, 1]), mode="sum")], 1)
        (gr,) = torch.autograd.grad(yr.square().sum(), t2)
        assert_close(g, gr, torch.float64, backend)


def test_module_reads_its_tables_by_position_after_parametrizations():
    """The module reads its ParameterList's entries directly (host time); it took them in the dict's order,
    which a removed parametrization changes (the table re-registered last: features read each other's tables),
    and a pruned table's unpruned original (review of the change, 2026-12-05). Outputs are those of the tables
    ``m.weights[t]`` gives."""
    import numpy as np  # noqa: PLC0415
    from torch.nn.utils import parametrize, prune  # noqa: PLC0415

    class Twice(torch.nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    m = MultiTableEmbeddingBag([(6, 3), (6, 3)], backend="cpu")
    idx, off = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2, 4])

    def expected() -> torch.Tensor:
        return kfuse.multi_embedding_bag([m.weights[0], m.weights[1]], idx, off, backend="reference")

    parametrize.register_parametrization(m.weights, "0", Twice())
    assert torch.equal(m(idx, off), expected())
    parametrize.remove_parametrizations(m.weights, "0")  # '0' now after '1' in the dict
    assert list(m.weights._parameters) == ["1", "0"]
    assert torch.equal(m(idx, off), expected())
    prune.random_unstructured(m.weights, "1", amount=0.5)
    assert torch.equal(m(idx, off), expected())
    with pytest.raises(TypeError, match=r"padding_idx array\(\[1, 2\]\) for table 1 must be an int or None"):
        kfuse.multi_embedding_bag([m.weights[0], m.weights[1]], idx, off, padding_idx=[None, np.array([1, 2])])


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad", "adam"])
def test_fused_module_refuses_memory_shared_with_its_tables(optimizer):
    """The fused update writes tables and states in place while reading them: two tables on one storage
    (through load_state_dict(assign=True)) were updated twice on the CPU backend and once by the reference,
    and per_sample_weights viewing a table gave schedule-dependent tables (layout hunt, 2026-12-05). Such
    calls are refused, naming both tensors, before anything is read or written; a gradient viewing a table
    likewise in the backward."""
    idx, off = torch.tensor([1, 1]), torch.tensor([0, 1, 2])
    for backend in ("cpu", "reference"):
        m = MultiTableEmbeddingBag([(8, 4), (8, 4)], optimizer=optimizer, lr=0.5, backend=backend)
        shared = torch.randn(8, 4)
        sd = dict(m.state_dict(), **{"weights.0": shared, "weights.1": shared})
        m.load_state_dict(sd, assign=True)
        with pytest.raises(ValueError, match="weights.0 and weights.1 share memory"):
            m(idx, off)
        assert torch.equal(m.weights[0], shared) and int(m.optimizer_step) == 0
        m = MultiTableEmbeddingBag([(8, 4)], optimizer=optimizer, lr=0.5, backend=backend)
        w0 = m.weights[0].detach().clone()
        with pytest.raises(ValueError, match="per_sample_weights and weights.0 share memory"):
            m(torch.tensor([1, 2]), torch.tensor([0, 2]), per_sample_weights=m.weights[0].detach().view(-1)[4:6])
        y = m(torch.tensor([1, 2]), torch.tensor([0, 2]))
        with pytest.raises(ValueError, match="grad_out and weights.0 share memory"):
            y.backward(m.weights[0].detach()[:1])
        assert torch.equal(m.weights[0].detach(), w0)


def test_per_sample_weights_dtype_follows_torch():
    """torch requires per_sample_weights in the weight's dtype; kfuse raises too, naming the argument,
    rather than casting them."""
    w, idx, off = torch.randn(10, 4), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2])
    for dt in (torch.float64, torch.float16):
        psw = torch.ones(4, dtype=dt)
        with pytest.raises(RuntimeError, match="per_sample_weights"):
            F.embedding_bag(idx, w, off, mode="sum", per_sample_weights=psw)
        words = r"per_sample_weights must have the tables' dtype \(torch.float32\)"
        with pytest.raises(TypeError, match=rf"kfuse.embedding_bag: {words}"):
            kfuse.embedding_bag(idx, w, off, mode="sum", per_sample_weights=psw)
        with pytest.raises(TypeError, match=rf"kfuse.multi_embedding_bag: {words}"):
            kfuse.multi_embedding_bag([w], idx, torch.tensor([0, 2, 4]), per_sample_weights=psw)
    half = w.half()
    psw = torch.rand(4).half()
    got = kfuse.embedding_bag(idx, half, off, mode="sum", per_sample_weights=psw)
    want = F.embedding_bag(idx, half.double(), off, mode="sum", per_sample_weights=psw.double())
    assert_close(got, want, torch.float16)
    # The multi-table op also takes float32 weights with half tables (FBGEMM's and TorchRec's convention);
    # the torch drop-in does not, as torch.
    got = kfuse.multi_embedding_bag([half], idx, torch.tensor([0, 2, 4]), per_sample_weights=psw.float())
    assert_close(got, want, torch.float16)
    with pytest.raises(TypeError, match=r"per_sample_weights must have the tables' dtype \(torch.float16\), as"):
        kfuse.embedding_bag(idx, half, off, mode="sum", per_sample_weights=psw.float())


@pytest.mark.parametrize(("backend", "device"), backends())
def test_offsets_without_include_last_offset(backend, device):
    """kfuse appends len(input) to the bag starts: an offset past the end is named as the caller passed
    it, not as the appended one out of order; empty offsets give torch's [0, dim] for empty input, and
    with indices (torch's result then reads memory that is not the input's) a clear error."""
    w = torch.randn(10, 4, device=device)
    idx, t = torch.tensor([1, 2], device=device), functools.partial(torch.tensor, device=device)
    with pytest.raises(RuntimeError, match="greater than input's length"):
        F.embedding_bag(idx.cpu(), w.cpu(), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"kfuse.embedding_bag: offsets\[1\] = 5 is past the end of input \(len 2\)"):
        kfuse.embedding_bag(idx, w, t([0, 5]), backend=backend)
    with pytest.raises(ValueError, match=r"offsets\[1\] = 3 is past the end of input \(len 2\)"):
        kfuse.embedding_bag(idx, w, t([0, 3, 4]), backend=backend)
    empty = t([], dtype=torch.int64)
    assert kfuse.embedding_bag(idx[:0], w, empty, backend=backend).shape == \
        F.embedding_bag(idx[:0].cpu(), w.cpu(), empty.cpu()).shape == (0, 4)
    with pytest.raises(ValueError, match=r"kfuse.embedding_bag: offsets is empty, so input's 2 indices are in no bag"):
        kfuse.embedding_bag(idx, w, empty, backend=backend)
    with pytest.raises(ValueError, match="offsets must not be empty with include_last_offset=True"):
        kfuse.embedding_bag(idx[:0], w, empty, include_last_offset=True, backend=backend)


@pytest.mark.parametrize(("backend", "device"), backends())
def test_mixed_index_dtypes_are_promoted_as_torch_does(backend, device):
    """int32 input with int64 offsets (or the reverse) is taken as int64, as torch does: the result is
    torch's (with torch's default mode, mean), and an int64 offset past 2**32 is refused, not wrapped to
    a valid int32 one."""
    import inspect  # noqa: PLC0415

    assert inspect.signature(kfuse.embedding_bag).parameters["mode"].default == \
        inspect.signature(F.embedding_bag).parameters["mode"].default == "mean"
    w = torch.randn(10, 4, device=device)
    i32, i64 = torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([0, 2])
    for idx, off in ((i32, i64), (i32.long(), i64.int())):
        want = F.embedding_bag(idx, w.cpu(), off)
        assert_close(kfuse.embedding_bag(idx.to(device), w, off.to(device), backend=backend).cpu(), want,
                     torch.float32)
    with pytest.raises(ValueError, match=r"offsets\[1\] = 4294967297 is past the end of input"):
        kfuse.embedding_bag(i32.to(device), w, torch.tensor([0, 2**32 + 1], device=device), backend=backend)
    with pytest.raises(ValueError, match="offsets"):
        kfuse.embedding_bag(i32.to(device), w, torch.tensor([0, 2**32 + 3], device=device), include_last_offset=True,
                            backend=backend)


def test_padding_idx_takes_numpy_and_tensor_integers_as_torch():
    """torch takes a numpy integer or a 0-d integer tensor as padding_idx; so do the ops (also per table)
    and kfuse.nn.EmbeddingBag, with torch's result; a bool or a float is refused, naming padding_idx."""
    w, idx, off = torch.randn(10, 4), torch.tensor([1, 2, 2, 5]), torch.tensor([0, 2])
    want = F.embedding_bag(idx, w, off, padding_idx=2)
    for p in (np.int64(2), torch.tensor(2), np.int32(-8)):
        assert_close(kfuse.embedding_bag(idx, w, off, padding_idx=p), want, torch.float32)
        for per_table in ([p], (p,), torch.tensor([int(p)]), range(int(p) % 10, int(p) % 10 + 1)):
            assert_close(kfuse.multi_embedding_bag([w], idx, torch.tensor([0, 2, 4]), mode="mean",
                                                   padding_idx=per_table), want, torch.float32)
        m = kfuse.nn.EmbeddingBag(10, 4, padding_idx=p)
        assert m.padding_idx == 2 and type(m.padding_idx) is int
        t = torch.nn.EmbeddingBag(10, 4, padding_idx=2)
        t.weight.data.copy_(m.weight.data)
        assert_close(m(idx, off), t(idx, off), torch.float32)
    for bad in (True, 2.0):  # (TypeErrors: type problems, not a range's; error-message hunt)
        with pytest.raises(TypeError, match="padding_idx"):
            kfuse.embedding_bag(idx, w, off, padding_idx=bad)
        with pytest.raises(TypeError, match="padding_idx"):
            kfuse.nn.EmbeddingBag(10, 4, padding_idx=bad)


def test_sparse_and_backend_are_keyword_only():
    """A call written to the positional signature (..., padding_idx, backend) cannot set sparse."""
    import inspect  # noqa: PLC0415

    w, idx, off = torch.randn(10, 4), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2])
    for fn in (kfuse.embedding_bag, kfuse.multi_embedding_bag):
        params = inspect.signature(fn).parameters
        assert params["sparse"].kind == params["backend"].kind == inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError, match="positional"):
        kfuse.embedding_bag(idx, w, off, "sum", None, False, None, "cpu")
    with pytest.raises(TypeError, match="positional"):
        kfuse.multi_embedding_bag([w], idx, torch.tensor([0, 2, 4]), None, "sum", None, None, "cpu")
    with pytest.raises(TypeError, match="kfuse.embedding_bag: sparse must be a bool; got 'cpu'"):
        kfuse.embedding_bag(idx, w, off, sparse="cpu")
    with pytest.raises(TypeError, match="kfuse.multi_embedding_bag: sparse must be a bool; got 1"):
        kfuse.multi_embedding_bag([w], idx, torch.tensor([0, 2, 4]), sparse=1)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_dense_half_gradient_makes_no_float32_table(backend):
    """The dense gradient of a half table was a float32 [rows, D] zeros cast afterwards: 3x the
    gradient's memory at its peak (fp16, 4M x 64: 1536 MiB against torch's 544; memory bug hunt,
    2026-12-04). Records every tensor the backward's ops make: none is a float32 table."""
    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415

    made: list[tuple[torch.dtype, tuple[int, ...]]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.extend((t.dtype, tuple(t.shape)) for t in torch.utils._pytree.tree_leaves(out)
                        if isinstance(t, torch.Tensor))
            return out

    w = torch.randn(300, 8, dtype=torch.float16, requires_grad=True)
    idx, off = torch.tensor([3, 7, 3, 299]), torch.tensor([0, 2])
    y = kfuse.embedding_bag(idx, w, off, mode="sum", backend=backend)
    with Record():
        (grad,) = torch.autograd.grad(y, w, torch.ones_like(y))
    assert (torch.float16, (300, 8)) in made and (torch.float32, (300, 8)) not in made
    want = torch.zeros(300, 8, dtype=torch.float16).index_put_((idx,), torch.ones(4, 8, dtype=torch.float16),
                                                              accumulate=True)
    assert torch.equal(grad, want)


def test_flags_and_table_sizes_of_the_wrong_kind_are_refused():
    """Type-confusion bug hunt (2026-12-04): a string include_last_offset was truthy (a bag fewer,
    silently; torch refuses it), and MultiTableEmbeddingBag truncated float and string table sizes
    (10.9 rows made 10)."""
    w, idx, off = torch.randn(10, 4), torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2, 5])
    for backend in ("cpu", "reference"):
        with pytest.raises(TypeError, match="include_last_offset must be a bool; got str 'False'"):
            kfuse.embedding_bag(idx, w, off, "sum", include_last_offset="False", backend=backend)
    for kw in ({"include_last_offset": "False"}, {"sparse": 0}):
        with pytest.raises(TypeError, match=f"nn.EmbeddingBag: {next(iter(kw))} must be a bool"):
            kfuse.nn.EmbeddingBag(10, 4, **kw)
    for tables in ([(10.9, 4)], [(10, 4.7)], [("10", 4)], [(torch.tensor(10.9), 4)], [(np.float64(3.5), 2)],
                   [(True, 4)], [(10,)], "10x4", 10):
        with pytest.raises(TypeError, match="MultiTableEmbeddingBag: tables must be a list of"):
            kfuse.nn.MultiTableEmbeddingBag(tables)
    m = kfuse.nn.MultiTableEmbeddingBag([(np.int64(6), torch.tensor(3)), (4, 2)])  # integers of any kind
    assert m.tables == [(6, 3), (4, 2)] and all(type(v) is int for t in m.tables for v in t)
    with pytest.raises(ValueError, match="MultiTableEmbeddingBag: lr is out of float's range"):
        kfuse.nn.MultiTableEmbeddingBag([(6, 3)], optimizer="sgd", lr=10**400)


@pytest.mark.parametrize(("backend", "device"), backends())
def test_sparse_gradients_are_coalesced_rows(backend, device, seed):
    gen = torch.Generator().manual_seed(seed)
    tables, ft = _tables(torch.float32), [0, 2, 0]
    weights = [torch.randn(r, d, generator=gen).to(device).requires_grad_() for r, d in tables]
    indices, offsets = make_bags(tables, ft, 6, gen)
    out = kfuse.multi_embedding_bag(weights, indices.to(device), offsets.to(device), ft, "sum", sparse=True,
                                    backend=backend)
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad.to(device))
    ref_w = [w.detach().cpu().double().requires_grad_() for w in weights]  # (the CPU indices' device)
    per_feature_torch(ref_w, indices, offsets, ft, "sum").backward(grad.double())
    for t, (w, r) in enumerate(zip(weights, ref_w, strict=True)):
        if r.grad is None:  # table 1 is read by no feature: no gradient, as torch's
            assert w.grad is None, f"table {t}"
            continue
        rg = r.grad
        rows, vals = sparse_grad(rg, indices, offsets, ft, t)
        assert w.grad.is_sparse and w.grad._nnz() == rows.numel(), f"table {t}: one entry per unique row"
        g = w.grad.coalesce().cpu()
        assert torch.equal(g.indices()[0], rows), f"table {t}: rows"
        assert_close(g.values(), vals, torch.float32, f"table {t}: values")
        assert_close(w.grad.to_dense().cpu(), rg, torch.float32, f"table {t}: dense")


# ---------------------------------------------------------------- fused optimizers
def _hand_written(opt, w, rows, g, state, step, lr=0.05, eps=1e-6, b1=0.9, b2=0.99, wd=0.01):
    """Per-row loops, written independently of kfuse.reference: the expected float64 update."""
    w = w.double().clone()
    for k, r in enumerate(rows.tolist()):
        gr = g[k].double()
        if opt == "sgd":
            w[r] -= lr * (gr + wd * w[r])
        elif opt == "rowwise_adagrad":
            gr = gr + wd * w[r]
            state[0][r] += float((gr * gr).mean())
            w[r] -= lr * gr / (state[0][r].double().sqrt() + eps)
        else:
            state[0][r] = b1 * state[0][r] + (1 - b1) * gr
            state[1][r] = b2 * state[1][r] + (1 - b2) * gr * gr
            mh, vh = state[0][r].double() / (1 - b1**step), state[1][r].double() / (1 - b2**step)
            w[r] -= lr * (mh / (vh.sqrt() + eps) + wd * w[r])
    return w


@pytest.mark.parametrize(("backend", "device"), [p for p in backends() if p.values[0] != "reference"])
@pytest.mark.parametrize("rows", [5, 1000])  # a few rows, and many (the C++ backward's sort-based plan)
def test_duplicate_rows_are_summed_in_increasing_position(backend, device, rows):
    """The kernels' backward sums a row's occurrences in increasing flat position (csrc/embedding/embedding.h,
    triton_kernels/embedding.py): bit-for-bit repeatability rests on it, but thread-count and torch comparisons
    also pass for any fixed order (a reversed sum survived them: mutation hunt, 2026-12-06). Gradients 1e8, -1e8, 1
    of one row sum to exactly 1 in that order and to 0 reversed; dense, sparse and the fused SGD update."""
    idx, off = torch.tensor([2, 2, 2], device=device), torch.tensor([0, 1, 2, 3], device=device)
    g = torch.tensor([1e8, -1e8, 1.0], device=device)[:, None].expand(3, 4).contiguous()
    for sparse in (False, True):
        w = torch.randn(rows, 4, device=device).requires_grad_()
        kfuse.multi_embedding_bag([w], idx, off, sparse=sparse, backend=backend).backward(g)
        grad = w.grad.to_dense() if sparse else w.grad
        assert torch.equal(grad[2], torch.ones(4, device=device)), (sparse, grad[2])
    m = MultiTableEmbeddingBag([(rows, 4)], optimizer="sgd", lr=1.0, backend=backend).to(device)
    w0 = m.weights[0].detach().clone()
    m(idx, off).backward(g)
    assert torch.equal(m.weights[0].detach()[2], w0[2] - 1.0)


@pytest.mark.parametrize(("backend", "device"), backends(torch.float64))
@pytest.mark.parametrize("opt", ["sgd", "rowwise_adagrad", "adam"])
def test_fused_optimizer_matches_hand_written(backend, device, opt, seed):
    gen = torch.Generator().manual_seed(seed)
    tables, ft = [(50, 6), (20, 3)], [0, 1, 0]
    m = MultiTableEmbeddingBag(tables, ft, "sum", optimizer=opt, lr=0.05, eps=1e-6, beta1=0.9, beta2=0.99,
                               weight_decay=0.01, backend=backend, dtype=torch.float64)
    states = [[torch.zeros(r, dtype=torch.float64)] if opt == "rowwise_adagrad" else
              [torch.zeros(r, d, dtype=torch.float64), torch.zeros(r, d, dtype=torch.float64)] for r, d in tables]
    expect = [w.detach().clone() for w in m.weights]
    for step in (1, 2, 3):
        indices, offsets = make_bags(tables, ft, 8, gen)
        out = m(indices, offsets)
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        ref_w = [w.detach().clone().requires_grad_() for w in expect]
        per_feature_torch(ref_w, indices, offsets, ft, "sum").backward(grad)
        out.backward(grad)
        for t in range(len(tables)):
            rows, g = sparse_grad(ref_w[t].grad, indices, offsets, ft, t)
            expect[t] = _hand_written(opt, expect[t], rows, g, states[t], step)
            assert_close(m.weights[t], expect[t], torch.float64, f"step {step} table {t}")
    assert int(m.optimizer_step) == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_stochastic_rounding_is_unbiased_and_brackets(dtype, seed):
    y = torch.randn(257) * 3
    rows, cols = torch.arange(4000).unsqueeze(1), torch.arange(257).unsqueeze(0)
    ys = y.expand(4000, 257)
    rounded = stochastic_round(ys, dtype, rounding_bits(seed, 3, 1, rows, cols))
    r = rounded.float()
    near = y.to(dtype).float()
    ulp = (near.abs() * (2.0**-10 if dtype == torch.float16 else 2.0**-7)).clamp(min=1e-7)
    assert ((r - y).abs() <= ulp * 2).all()  # lo or hi only
    assert ((r.mean(0) - y).abs() <= 0.1 * ulp).all()  # unbiased (the nearest rounding is off by up to ulp/2)
    # The bits depend on each of seed, step and table: another one rounds other elements the other way,
    # about 2p(1 - p) of them (p the chance of rounding up), while the same triple repeats its choices.
    assert torch.equal(stochastic_round(ys, dtype, rounding_bits(seed, 3, 1, rows, cols)).view(torch.int16),
                       rounded.view(torch.int16))
    p = (r == r.max(0).values).float().mean(0)  # per column: the share rounded to the larger neighbour
    expected = (2 * p * (1 - p)).mean().item()
    for other in ((seed + 1, 3, 1), (seed, 4, 1), (seed, 3, 2)):
        again = stochastic_round(ys, dtype, rounding_bits(*other, rows, cols))
        differ = (again.view(torch.int16) != rounded.view(torch.int16)).float().mean().item()
        assert abs(differ - expected) < 0.01, (other, differ, expected)


@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtypes([torch.float32, torch.bfloat16]))
def test_fused_checkpoint_resumes_to_the_same_bits(backend, device, dtype, tmp_path, seed):
    tables, ft = [(40, 8), (30, 5)], [0, 1, 1]

    def batches(k):
        gen = torch.Generator().manual_seed(seed + k)
        return make_bags(tables, ft, 5, gen), torch.randn(5, 18, generator=gen).to(device, dtype)

    def train(m, ks):
        for k in ks:
            (idx, off), g = batches(k)
            m(idx.to(device), off.to(device)).backward(g)

    def make():
        torch.manual_seed(seed)
        return MultiTableEmbeddingBag(tables, ft, optimizer="adam", dtype=dtype, seed=7, backend=backend,
                                      device=device)

    a = make()
    train(a, [0, 1])
    torch.save(a.state_dict(), tmp_path / "ckpt.pt")
    train(a, [2, 3])
    b = make()
    b.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    assert int(b.optimizer_step) == 2
    # A checkpoint from before the step buffer's rename (its key was "step") resumes the same way.
    old = {("step" if k == "optimizer_step" else k): v for k, v in torch.load(tmp_path / "ckpt.pt").items()}
    c = make()
    c.load_state_dict(old)
    assert int(c.optimizer_step) == 2
    train(b, [2, 3])
    train(c, [2, 3])
    for m in (b, c):
        for wa, wb in zip(a.weights, m.weights, strict=True):
            assert torch.equal(wa.view(torch.int16) if dtype == torch.bfloat16 else wa,
                               wb.view(torch.int16) if dtype == torch.bfloat16 else wb)
        assert all(torch.equal(x, y) for x, y in zip(a.buffers(), m.buffers(), strict=True))


def test_a_subclass_may_define_step():
    """The fused optimizer's step count is the buffer ``optimizer_step``, so a subclass (a training
    wrapper) can have a ``step()`` method: registering a buffer named ``step`` would raise."""
    class Trainer(MultiTableEmbeddingBag):
        def step(self) -> str:
            return "stepped"

    m = Trainer([(10, 4)], optimizer="sgd")
    m(torch.tensor([1, 2]), torch.tensor([0, 2])).sum().backward()
    assert m.step() == "stepped" and int(m.optimizer_step) == 1


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad", "adam"])
def test_reference_fused_step_failing_part_way_changes_nothing(monkeypatch, optimizer, seed):
    """The reference (and process_group) fused step wrote table 0 before computing table 1: a failure
    there (out of memory, an interrupt) left table 0 and its states updated with the step not counted,
    and a retried step applied it twice (exceptions hunt, 2026-12-04). Every write now follows every
    table's computation."""
    import kfuse.nn.embedding as nn_embedding  # noqa: PLC0415

    m = MultiTableEmbeddingBag([(10, 4), (7, 3), (5, 2)], optimizer=optimizer, backend="reference")
    idx, off = torch.tensor([1, 2, 3, 1, 4, 0]), torch.tensor([0, 2, 3, 4, 5, 6, 6])
    m(idx, off).sum().backward()  # one clean step first: states non-zero
    before = {k: v.clone() for k, v in m.state_dict().items()}
    real, calls = nn_embedding._row_updates, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("injected")
        return real(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(nn_embedding, "_row_updates", failing)
        with pytest.raises(MemoryError, match="injected"):
            m(idx, off).sum().backward()
    after = m.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), optimizer


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_rounding_seeds_differ_in_their_high_word(backend):
    """The kernels keyed the stochastic rounding by the seed's low 32 bits: seeds 5 and 5 + 2**32 (a rank in
    the high word) trained bit-identical bf16 tables (optimizer hunt, 2026-12-05). The high word is now
    xor-ed in; seeds below 2**32 keep their streams."""
    idx, off = torch.tensor([0, 1, 2, 3, 1]), torch.tensor([0, 2, 5])
    tables = []
    for s in (5, 5 + 2**32, 5):
        torch.manual_seed(0)
        m = MultiTableEmbeddingBag([(4, 64)], optimizer="sgd", lr=0.37, dtype=torch.bfloat16, seed=s,
                                   backend=backend)
        m(idx, off).float().pow(2).sum().backward()
        tables.append(m.weights[0].detach().clone())
    assert not torch.equal(tables[0], tables[1]) and torch.equal(tables[0], tables[2])
    assert kfuse.nn.embedding._rounding_seed(5) == 5 and kfuse.nn.embedding._rounding_seed(5 + 2**32) == 4


def test_row_updates_round_half_tables_stochastically(seed):
    m = MultiTableEmbeddingBag([(10, 64)], optimizer="sgd", lr=1e-3, dtype=torch.bfloat16, seed=3, backend="reference")
    w0 = m.weights[0].detach().float().clone()
    g = torch.full((1, 64), 1.0)
    for dst, rows, val in _row_updates(m, 0, torch.tensor([4]), g, 1):
        dst[rows] = val
    new = m.weights[0].detach().float()[4]
    exact = w0[4] - 1e-3
    # values move by less than a bf16 ulp: nearest rounding would mostly leave them unchanged
    assert (new != w0[4]).any() and ((new - exact).abs() <= exact.abs() * 2**-7).all()


# ---------------------------------------------------------------- modules
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_module_is_a_drop_in(mode, seed):
    t = torch.nn.EmbeddingBag(20, 6, mode=mode, padding_idx=2)
    k = kfuse.nn.EmbeddingBag.from_torch(t)
    assert k.weight is t.weight
    idx = torch.tensor([1, 2, 5, 5, 19, 0, 2])
    off = torch.tensor([0, 3, 3])
    psw = torch.rand(7) if mode == "sum" else None
    got, want = k(idx, off, psw), t(idx, off, psw)
    assert_close(got, want, torch.float32)
    g = torch.randn(got.shape)
    (g_got,), (g_want,) = torch.autograd.grad(got, k.weight, g), torch.autograd.grad(want, t.weight, g)
    assert_close(g_got, g_want, torch.float32, "grad")
    fresh = kfuse.nn.EmbeddingBag(20, 6, mode=mode, padding_idx=2)
    fresh.load_state_dict(t.state_dict())
    assert torch.equal(fresh(idx, off, psw), k(idx, off, psw))


def test_from_pretrained_leaves_the_passed_parameter_as_it_was():
    """As torch's: from_pretrained and _weight wrap the tensor in a Parameter of their own over its memory.
    They set requires_grad on the Parameter passed in, another module's, before: freezing the bag froze
    (or unfroze) that module (module hunt, 2026-12-05)."""
    for cls in (torch.nn.EmbeddingBag, kfuse.nn.EmbeddingBag):
        for freeze in (True, False):
            src = torch.nn.Parameter(torch.randn(5, 3), requires_grad=freeze)  # the opposite of the bag's
            m = cls.from_pretrained(src, freeze=freeze, mode="sum")
            assert src.requires_grad is freeze and m.weight.requires_grad is not freeze, cls
            assert m.weight is not src and m.weight.data_ptr() == src.data_ptr(), cls
        src = torch.nn.Parameter(torch.randn(5, 3), requires_grad=False)
        m = cls(5, 3, mode="sum", _weight=src)
        assert m.weight.requires_grad and not src.requires_grad and m.weight.data_ptr() == src.data_ptr(), cls


def test_torch_arguments_from_pretrained_and_meta(seed):
    """torch's own calls (max_norm=None, norm_type, scale_grad_by_freq at their defaults: nn.EmbeddingBag
    passes them) raised TypeError; from_pretrained was missing; a non-contiguous weight's error named
    weights[0]; meta tensors failed in the reference's value slicing (bug hunt 2026-12-04)."""
    w, idx, off = torch.randn(10, 3), torch.tensor([1, 2, 4, 5, 4, 3]), torch.tensor([0, 3])
    want = F.embedding_bag(idx, w, off, mode="sum")
    got = kfuse.embedding_bag(idx, w, off, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, mode="sum")
    assert torch.equal(got, want)
    for bad in ({"max_norm": 1.0}, {"scale_grad_by_freq": True}, {"norm_type": 1.0}):
        with pytest.raises(NotImplementedError, match="max_norm, norm_type and scale_grad_by_freq"):
            kfuse.embedding_bag(idx, w, off, **bad)
        with pytest.raises(NotImplementedError, match="max_norm, norm_type and scale_grad_by_freq"):
            kfuse.nn.EmbeddingBag(10, 3, **bad)
    with pytest.raises(ValueError, match="puts mode where torch has max_norm"):
        kfuse.embedding_bag(idx, w, off, None, 2.0, False, "sum")
    # Hunt 2026-12-05: set after construction (torch's module reads them at each forward), they were ignored.
    for name, value in (("max_norm", 0.5), ("norm_type", 1.0), ("scale_grad_by_freq", True)):
        m = kfuse.nn.EmbeddingBag(10, 3, mode="sum")
        setattr(m, name, value)
        with pytest.raises(NotImplementedError, match="max_norm, norm_type and scale_grad_by_freq"):
            m(idx, off)
    m = kfuse.nn.EmbeddingBag.from_pretrained(w, mode="sum")
    assert m.weight is not None and not m.weight.requires_grad and torch.equal(m(idx, off), want)
    assert kfuse.nn.EmbeddingBag.from_pretrained(w, freeze=False).weight.requires_grad
    assert kfuse.nn.EmbeddingBag.from_torch(m).weight is m.weight  # a kfuse module has torch's attributes
    with pytest.raises(ValueError, match=r"weight must be contiguous .* pass weight.contiguous\(\)"):
        kfuse.embedding_bag(idx, w.t().contiguous().t(), off)
    with pytest.raises(ValueError, match="_weight must be contiguous"):
        kfuse.nn.EmbeddingBag(10, 3, _weight=torch.randn(3, 10).t())
    # Review 2026-12-04: from_pretrained's error named the constructor's _weight; a bad backend passed the
    # modules' constructors and failed at the first forward; a 3-D input's error gave its dtype, not its rank.
    with pytest.raises(ValueError, match=r"from_pretrained: embeddings must be contiguous"):
        kfuse.nn.EmbeddingBag.from_pretrained(torch.randn(3, 10).t())
    with pytest.raises(ValueError, match="nn.EmbeddingBag: backend must be 'auto' or one of"):
        kfuse.nn.EmbeddingBag(10, 3, backend="bogus")
    with pytest.raises(ValueError, match="MultiTableEmbeddingBag: backend must be 'auto' or one of"):
        kfuse.nn.MultiTableEmbeddingBag([(10, 3)], backend="bogus")
    with pytest.raises(ValueError, match="input must be a 1-D or 2-D int32/int64 tensor; got 3-D torch.int64"):
        kfuse.embedding_bag(idx.view(1, 2, 3), w)
    assert "feature_table_map=[0, 0], mode='sum'" in repr(kfuse.nn.MultiTableEmbeddingBag([(10, 3)], [0, 0]))
    meta = kfuse.nn.EmbeddingBag(10, 3, mode="sum", device="meta")
    out = meta(idx.to("meta"), off.to("meta"))
    assert out.device.type == "meta" and out.shape == (2, 3)


@pytest.mark.parametrize(("backend", "device"), backends(torch.float64))
def test_fused_optimizer_with_per_sample_weights(backend, device, seed):
    """The fused module's weighted path: the output and per_sample_weights' gradient as the reference's
    (from the tables before the update), and the tables updated by a hand-written SGD step."""
    gen = torch.Generator().manual_seed(seed)
    tables, ft = [(50, 6), (20, 3)], [0, 1, 0]
    m = MultiTableEmbeddingBag(tables, ft, "sum", optimizer="sgd", lr=0.05, weight_decay=0.01, backend=backend,
                               dtype=torch.float64)
    before = [w.detach().clone() for w in m.weights]
    indices, offsets = make_bags(tables, ft, 8, gen)
    psw = torch.randn(indices.numel(), generator=gen, dtype=torch.float64, requires_grad=True)
    out = m(indices, offsets, psw)
    ref_w = [w.clone().requires_grad_() for w in before]
    ref_psw = psw.detach().clone().requires_grad_()
    ref = multi_embedding_bag_reference(ref_w, indices, offsets, ft, 0, ref_psw)
    assert_close(out, ref, torch.float64, "forward")
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(grad)
    ref.backward(grad)
    assert_close(psw.grad, ref_psw.grad, torch.float64, "grad of per_sample_weights")
    for t in range(len(tables)):
        rows, g = sparse_grad(ref_w[t].grad, indices, offsets, ft, t)
        assert_close(m.weights[t], _hand_written("sgd", before[t], rows, g, None, 1), torch.float64, f"table {t}")
    assert int(m.optimizer_step) == 1


def test_sparse_under_fake_tensors_keeps_its_error():
    """embedding_bag names past-the-end offsets by reading them on the host after a backend's error; with
    fake (traced) tensors there is nothing to read, and the backend's own error must stand."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    w, idx, off = torch.randn(10, 4), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2])
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fw, fi, fo = (mode.from_tensor(t) for t in (w.requires_grad_(), idx, off))
        with pytest.raises(ValueError, match="sparse"):
            kfuse.embedding_bag(fi, fw, fo, mode="sum", sparse=True, backend="cpu")


def test_fused_step_count_stays_on_the_cpu():
    """The fused backward reads the step count with int(): on the CPU whatever the module is moved to
    ("meta" stands in for .cuda()), so it never syncs with a GPU; state_dict still holds it."""
    m = MultiTableEmbeddingBag([(10, 4)], optimizer="adam")
    m.to("meta")
    assert m.weights[0].device.type == "meta" and m.momentum1_0.device.type == "meta"
    assert m.optimizer_step.device.type == "cpu" and dict(m.named_buffers())["optimizer_step"] is m.optimizer_step
    m = MultiTableEmbeddingBag([(10, 4)], optimizer="sgd")
    m._apply(lambda t: t.clone())
    m.to(torch.float64)
    m(torch.tensor([1, 2]), torch.tensor([0, 2])).sum().backward()
    assert m.optimizer_step.device.type == "cpu" and int(m.state_dict()["optimizer_step"]) == 1


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
def test_fused_module_built_on_meta(optimizer):
    """Deferred initialisation (built under torch.device("meta"), then to_empty + reset_parameters)
    trains as a module built in place: reset_parameters also zeroes the optimizer state and the step,
    which to_empty leaves uninitialised, and the step stays a CPU tensor throughout."""
    tables, idx, off = [(10, 4), (8, 4)], torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2, 4])
    with torch.device("meta"):
        m = MultiTableEmbeddingBag(tables, optimizer=optimizer)
    assert m.weights[0].is_meta and m.optimizer_step.device.type == "cpu"
    m.to_empty(device="cpu")
    for s in m.states(1):
        s.fill_(float("nan"))  # what to_empty may leave there
    m.optimizer_step.fill_(123)
    torch.manual_seed(0)
    m.reset_parameters()
    torch.manual_seed(0)
    ref = MultiTableEmbeddingBag(tables, optimizer=optimizer)
    for mod in (m, ref):
        mod(idx, off).sum().backward()
    assert int(m.optimizer_step) == 1
    for a, b in zip(m.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer", [None, "sgd"])
def test_padding_rows_start_zero_and_reset_to_zero(optimizer):
    """Padding rows are zero in a new module, after reset_parameters, and after to_empty + reset_parameters, as in
    torch's EmbeddingBag: no value test saw them (the ops skip padding rows), but a state_dict or a table handed to
    torch does (mutation hunt, 2026-12-06). Every other row is drawn."""
    tables, pads = [(10, 4), (8, 4), (6, 3)], [None, 3, -1]
    m = MultiTableEmbeddingBag(tables, padding_idx=pads, optimizer=optimizer)
    with torch.device("meta"):
        deferred = MultiTableEmbeddingBag(tables, padding_idx=pads, optimizer=optimizer)
    deferred.to_empty(device="cpu")
    for w in deferred.weights:
        w.detach().fill_(float("nan"))  # what to_empty may leave there
    for mod in (m, deferred):
        for reset in (False, True):
            if reset:
                with torch.no_grad():
                    for w in mod.weights:
                        w.fill_(7.0)
            if reset or mod is deferred:
                mod.reset_parameters()
            w1, w2 = (w.detach() for w in mod.weights[1:])
            assert torch.equal(w1[3], torch.zeros(4)) and torch.equal(w2[5], torch.zeros(3))
            assert w1[[0, 1, 2, 4, 5, 6, 7]].abs().min() > 0 and w2[:5].abs().min() > 0
            assert mod.weights[0].detach().abs().min() > 0


def test_fused_module_built_on_meta_and_assigned_a_checkpoint_has_every_parameter_there(seed):
    """Built under torch.device("meta") and given a checkpoint with load_state_dict(assign=True) (loading a large
    model without initialising it twice), the fused module kept its meta _grad_anchor (never saved: the load put
    the meta one back), its first parameter: next(model.parameters()) was on meta and clip_grad_norm_ and .to()
    failed ("Cannot copy out of meta tensor"; module-conventions hunt). The anchor now follows the tables."""
    idx, off = torch.tensor([0, 1, 2, 3, 1, 0, 4, 5, 7, 7]), torch.tensor([0, 2, 4, 6, 10])

    def build() -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict({"emb": MultiTableEmbeddingBag([(10, 4), (8, 4)], optimizer="adam", lr=0.1),
                                    "lin": torch.nn.Linear(8, 1)})

    ref = build()
    with torch.device("meta"):
        model = build()
    model.load_state_dict(ref.state_dict(), assign=True)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    for m in (model, ref):
        m["lin"](m["emb"](idx, off)).pow(2).sum().backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    model.to(torch.float64)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fused_module_refuses_assigned_states_it_cannot_update_and_parametrized_tables(backend):
    """Optimizer states brought by load_state_dict(assign=True) in another dtype (Adam's v in float16, which
    the module's casts prevent) or layout: the cpu backend refused them in the backward while the reference
    trained on; the load now refuses them, naming each. A parametrized table (each read a new tensor) was
    taken by the forward and failed in the backward naming swapped tables; the forward names it now
    (module-conventions hunt)."""
    m = MultiTableEmbeddingBag([(10, 4), (8, 4)], optimizer="adam", backend=backend)
    sd = m.state_dict()
    bad = {**sd, "momentum2_0": sd["momentum2_0"].half(), "momentum1_1": sd["momentum1_1"].t().contiguous().t()}
    fresh = torch.nn.ModuleDict({"emb": MultiTableEmbeddingBag([(10, 4), (8, 4)], optimizer="adam", backend=backend)})
    with pytest.raises(RuntimeError, match=r"(?s)emb\.momentum2_0: with assign=True .*float16.*emb\.momentum1_1: .*"
                                           r"non-contiguous"):
        fresh.load_state_dict({f"emb.{k}": v for k, v in bad.items()}, assign=True)
    # not assigned (review: the refused states were taken all the same)
    assert fresh["emb"].momentum2_0.dtype == torch.float32 and fresh["emb"].momentum1_1.is_contiguous()
    m.load_state_dict(bad)  # a copying load converts them
    assert m.momentum2_0.dtype == torch.float32
    # A pruned table (weights.0 = weights.0_orig · mask, computed at each read) took the update into that
    # temporary: its training was lost, state_dict saved weights.0_orig unchanged (module-conventions hunt,
    # 2026-12-07).
    pruned = copy.deepcopy(m)
    torch.nn.utils.prune.l1_unstructured(pruned.weights, "0", 0.3)
    with pytest.raises(RuntimeError, match="weights.0 is computed at each read .*pruned"):
        pruned(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3]))
    torch.nn.utils.parametrize.register_parametrization(m.weights, "1", torch.nn.Identity())
    with pytest.raises(RuntimeError, match="weights.1 is computed at each read .parametrized"):
        m(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3]))


def test_arguments_of_the_wrong_kind_are_named():
    """Errors that named another argument or none (error-message hunt): nn.EmbeddingBag's sizes were unchecked
    (-1 rows blamed padding_idx, True made a [10, 1] table), a float or bool padding_idx was "not within" a
    range it is in, from_pretrained(freeze='False') froze, embedding_bag's device errors named "indices" and
    "the tables", a sparse weight showed its 2-D shape only, MultiTableEmbeddingBag took sparse='False' by
    truth, an integer dtype and feature_table_map=0 failed inside torch or Python."""
    from kfuse.nn import EmbeddingBag  # noqa: PLC0415

    for args, err, msg in (((-1, 4), ValueError, "num_embeddings must be >= 0"),
                           ((10, True), TypeError, "embedding_dim must be an int; got bool"),
                           ((10.0, 4), TypeError, "num_embeddings must be an int; got float")):
        with pytest.raises(err, match=msg):
            EmbeddingBag(*args)
    with pytest.raises(TypeError, match="padding_idx must be an int; got float"):
        EmbeddingBag(10, 4, padding_idx=1.0)
    assert EmbeddingBag(10, 4, padding_idx=np.int64(-1)).padding_idx == 9
    with pytest.raises(TypeError, match="freeze must be a bool; got str"):
        EmbeddingBag.from_pretrained(torch.randn(5, 4), freeze="False")
    w, idx, off = torch.randn(10, 4), torch.tensor([1, 2]), torch.tensor([0])
    with pytest.raises(TypeError, match=r"padding_idx 1\.5 for table 0 must be an int or None; got float"):
        kfuse.multi_embedding_bag([w], idx, torch.tensor([0, 2]), padding_idx=[1.5])
    with pytest.raises(ValueError, match="embedding_bag: input is on meta; weight is on cpu"):
        kfuse.embedding_bag(idx.to("meta"), w, off)
    with pytest.raises(ValueError, match=r"weight must be a dense 2-D tensor \[rows, dim\]; got \(10, 4\) "
                                         r"torch\.sparse_coo"):
        kfuse.embedding_bag(idx, w.to_sparse(), off)
    with pytest.raises(TypeError, match="sparse must be a bool; got str"):
        MultiTableEmbeddingBag([(5, 4)], sparse="False", optimizer="adam")
    with pytest.raises(TypeError, match="dtype must be float32, float64, float16 or bfloat16; got torch.int64"):
        MultiTableEmbeddingBag([(5, 4)], dtype=torch.int64)
    with pytest.raises(ValueError, match="feature_table_map must be a non-empty list"):
        MultiTableEmbeddingBag([(5, 4)], feature_table_map=0)
    for ftm in (torch.tensor([1, 0]), np.array([1, 0]), (t for t in (1, 0)), [np.int64(1), 0]):  # (review)
        assert MultiTableEmbeddingBag([(5, 4), (6, 4)], feature_table_map=ftm).feature_table_map == [1, 0]
    assert MultiTableEmbeddingBag([(5, 4)], dtype=None).weights[0].dtype == torch.get_default_dtype()
    assert EmbeddingBag(0, 4).weight.shape == (0, 4)  # as torch's


def test_fused_optimizer_settings_without_one_are_refused():
    """With optimizer=None set_hyperparameters changed nothing (drop-in hunt): refused, naming what to use
    instead (a process_group there: test_a_module_with_a_process_group_copies_and_pickles, with a real group)."""
    with pytest.raises(RuntimeError, match="no fused optimizer.*param_groups"):
        MultiTableEmbeddingBag([(10, 4)]).set_hyperparameters(lr=0.1)


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_module_cast_keeps_float32_moments(optimizer, dtype):
    """.half() / .to(bfloat16) of a module with a fused optimizer casts the tables only: the moments stay
    float32 (as documented, and as a module built in that dtype has them) with their values, and the
    step then equals that of a module built in the dtype with the same state, on both CPU backends."""
    tables, idx, off = [(10, 4), (8, 4)], torch.tensor([1, 2, 3, 3]), torch.tensor([0, 2, 4])
    for backend in ("cpu", "reference"):
        m = MultiTableEmbeddingBag(tables, optimizer=optimizer, backend=backend)
        m(idx, off).sum().backward()  # non-zero moments
        moments = [s.clone() for s in (*m.states(1), *m.states(2))]
        m = m.to(dtype)
        assert all(s.dtype == torch.float32 for s in (*m.states(1), *m.states(2))), backend
        assert all(torch.equal(a, b) for a, b in zip(moments, (*m.states(1), *m.states(2)), strict=True))
        built = MultiTableEmbeddingBag(tables, optimizer=optimizer, dtype=dtype, backend=backend)
        built.load_state_dict(m.state_dict())
        for mod in (m, built):
            mod(idx, off).sum().backward()
        for a, b in zip(m.state_dict().values(), built.state_dict().values(), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), backend


def test_fused_module_forward_without_grad_inside_a_backward_is_not_a_recompute():
    """A gradient hook logging the tables' output (a no_grad forward) after another call's backward updated
    them: refused as a stale checkpoint recompute, which it is not, and the backward stopped after one of its two
    updates (re-entrancy hunt, 2026-12-07). It runs, as torch's own EmbeddingBag does there."""
    torch.manual_seed(0)
    m = MultiTableEmbeddingBag([(10, 4), (8, 4)], optimizer="sgd", lr=0.1)
    idx, off = torch.tensor([1, 2, 3, 1, 5, 6]), torch.tensor([0, 2, 3, 5, 6])
    y2, y1, log = m(idx, off), m(idx, off), []

    def monitor(g):
        with torch.no_grad():
            log.append(m(idx, off))
        return g

    y2.register_hook(monitor)
    (y1.sum() + y2.pow(2).sum()).backward()
    assert int(m.optimizer_step) == 2 and len(log) == 1


def test_fused_module_refuses_swapped_tables_and_stale_checkpoint_recomputes():
    """The fused backward updates the module's own tables: called through torch.func.functional_call with
    other tables it raises (it updated the unused ones and took the psw gradient at them); and activation
    checkpointing that recomputes a call after another call's backward updated the tables raises (the
    recomputed output differed from the original, silently). One checkpointed region per backward gives
    the plain run's results (training-utilities hunt)."""
    from torch.utils.checkpoint import checkpoint

    idx, off = torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3])
    m = MultiTableEmbeddingBag([(10, 4)], optimizer="sgd", lr=0.5)
    w0 = m.weights[0].detach().clone()
    out = torch.func.functional_call(m, {"weights.0": torch.randn(10, 4)}, (idx, off))
    with pytest.raises(RuntimeError, match="tables this call's forward read are no longer the module's"):
        out.sum().backward()
    assert torch.equal(m.weights[0], w0)

    def run(ckpt: bool, regions: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        m = MultiTableEmbeddingBag([(10, 4)], optimizer="sgd", lr=0.5)
        lin = torch.nn.Linear(4, 1)
        f = lambda i, o: (lin(m(i, o)) ** 2).sum()  # noqa: E731
        loss = sum(checkpoint(f, idx, off, use_reentrant=False) if ckpt else f(idx, off) for _ in range(regions))
        loss.backward()
        return lin.weight.grad, m.weights[0].detach()

    for got, want in zip(run(True, 1), run(False, 1), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="activation checkpointing recomputes this forward after the fused"):
        run(True, 2)
    # Selective checkpointing's dispatch mode: refused, saying so (the error named tracing alone; training-loop
    # hunt, 2026-12-07), as sparse gradients are
    import functools  # noqa: PLC0415

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts  # noqa: PLC0415

    sac = functools.partial(create_selective_checkpoint_contexts, lambda *a, **k: CheckpointPolicy.PREFER_RECOMPUTE)
    with pytest.raises(RuntimeError, match="selective activation checkpointing"):
        checkpoint(lambda i, o: m(i, o).tanh(), idx, off, use_reentrant=False, context_fn=sac).sum().backward()
    bag = kfuse.nn.EmbeddingBag(10, 4, mode="sum", sparse=True, backend="cpu")
    with pytest.raises(ValueError, match="selective activation checkpointing"):
        checkpoint(lambda i, o: bag(i, o).tanh(), idx, off, use_reentrant=False, context_fn=sac).sum().backward()


def test_fused_module_refuses_a_psw_gradient_from_updated_tables():
    """Two calls, then one backward: the second call's backward updates the tables first, so the first
    call's per_sample_weights gradient cannot be taken at the tables its forward read; it raises (as
    torch's version counter would for a table changed in place) rather than returning a wrong gradient.
    One call per backward gives the gradient at the forward's tables."""
    idx, off = torch.tensor([1, 2, 2]), torch.tensor([0, 2, 3])
    m = MultiTableEmbeddingBag([(10, 4)], optimizer="sgd", lr=1.0)
    w0 = m.weights[0].detach().clone()
    p1, p2 = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="per_sample_weights needs the tables as this call's forward read them"):
        (m(idx, off, p1).sum() + m(idx, off, p2).sum()).backward()
    m = MultiTableEmbeddingBag([(10, 4)], optimizer="sgd", lr=1.0)
    m.load_state_dict({"weights.0": w0, "optimizer_step": torch.tensor(0)}, strict=False)
    for p in (p1, p2):
        p.grad = None
        m(idx, off, p).sum().backward()
    assert_close(p1.grad, w0[idx].sum(1), torch.float32)
    assert not torch.equal(p2.grad, p1.grad)  # the second call read the updated tables


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fused_module_freezes_as_torch_modules_do(backend):
    """requires_grad_(False) on the module, or on a model holding it, freezes the tables as it freezes
    ordinary ones: the fused backward updates nothing (the step count stays), while a head and the
    per_sample_weights still get their gradients; requires_grad_(True) resumes training. The backward
    hook is a parameter for that, but holds nothing: state_dict leaves it out (bug hunt)."""
    idx, off = torch.tensor([1, 2, 3, 0, 4]), torch.tensor([0, 2, 3, 5])
    m = MultiTableEmbeddingBag([(6, 4)], optimizer="adam", lr=0.1, backend=backend)
    head = torch.nn.Linear(4, 1)
    model = torch.nn.ModuleList([m, head])
    assert sorted(m.state_dict()) == ["momentum1_0", "momentum2_0", "optimizer_step", "weights.0"]
    for freeze in (m.requires_grad_, model.requires_grad_):
        freeze(False)
        head.requires_grad_(True)
        before = m.weights[0].detach().clone()
        psw = torch.rand(5, requires_grad=True)
        m(idx, off, psw).sum().backward()  # the psw gradient alone
        head(m(idx, off)).sum().backward()
        assert torch.equal(m.weights[0], before) and int(m.optimizer_step) == 0
        assert psw.grad is not None and head.weight.grad is not None
    m.requires_grad_(True)
    head(m(idx, off)).sum().backward()
    assert not torch.equal(m.weights[0], before) and int(m.optimizer_step) == 1
    fresh = MultiTableEmbeddingBag([(6, 4)], optimizer="adam", lr=0.1, backend=backend)
    fresh.load_state_dict(m.state_dict())  # strict: the hook is not expected
    assert torch.equal(fresh.weights[0], m.weights[0])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fused_module_trains_only_when_its_gradient_is_asked_for(backend):
    """A query for other inputs' gradients (torch.autograd.grad of per_sample_weights, backward(inputs=...)
    over a head) updated the tables and counted a step, where an ordinary table is left alone (training-loop
    hunt); the query's own gradients are unchanged. A plain backward, or autograd.grad over the module's
    parameters, still trains."""
    idx, off = torch.tensor([1, 2, 3, 0, 4]), torch.tensor([0, 2, 3, 5])
    m = MultiTableEmbeddingBag([(6, 4)], optimizer="adam", lr=0.1, backend=backend)
    head = torch.nn.Linear(4, 1)
    before = m.weights[0].detach().clone()
    psw = torch.rand(5, requires_grad=True)
    (g_psw,) = torch.autograd.grad(head(m(idx, off, psw)).sum(), psw)
    head(m(idx, off, psw)).sum().backward(inputs=list(head.parameters()))
    assert torch.equal(m.weights[0], before) and int(m.optimizer_step) == 0
    assert head.weight.grad is not None
    plain = torch.nn.EmbeddingBag.from_pretrained(before, freeze=False, mode="sum")
    want = torch.autograd.grad(head(plain(idx, off, per_sample_weights=psw)).sum(), psw)[0]
    assert_close(g_psw, want, torch.float32, "grad of per_sample_weights")
    torch.autograd.grad(head(m(idx, off)).sum(), [p for p in m.parameters() if p.requires_grad])
    assert not torch.equal(m.weights[0], before) and int(m.optimizer_step) == 1
    head(m(idx, off)).sum().backward()
    assert int(m.optimizer_step) == 2


def test_fused_module_hyper_parameters_change_between_steps():
    """set_hyperparameters changes the fused optimizer's lr (a schedule) for the next update, checked as the
    constructor checks it; a value written into hparams directly is checked at the next update, which
    refuses a NaN lr and leaves the tables as they were (it made them NaN; training-loop hunt)."""
    idx, off = torch.tensor([1, 2]), torch.tensor([0, 2])

    def step_size(m: MultiTableEmbeddingBag) -> float:
        before = m.weights[0].detach().clone()
        m(idx, off).sum().backward()
        return float((m.weights[0] - before).abs().max())

    m = MultiTableEmbeddingBag([(4, 3)], optimizer="sgd", lr=0.2)
    held = m.hparams  # a scheduler's reference: the dict is changed in place, never replaced
    assert step_size(m) == pytest.approx(0.2)
    m.set_hyperparameters(lr=0.02)
    assert m.hparams["lr"] == pytest.approx(0.02) and step_size(m) == pytest.approx(0.02)
    held["lr"] = 0.0
    assert step_size(m) == 0.0 and held is m.hparams
    copy.copy(m).set_hyperparameters(lr=0.5)  # a shallow copy's own
    assert m.hparams["lr"] == 0.0
    with pytest.raises(ValueError, match="MultiTableEmbeddingBag: lr must be finite"):
        m.set_hyperparameters(lr=float("nan"))
    with pytest.raises(TypeError, match=r"unknown \['momentum'\]"):
        m.set_hyperparameters(momentum=0.9)
    m.hparams["lr"] = float("nan")
    before = m.weights[0].detach().clone()
    with pytest.raises(ValueError, match="MultiTableEmbeddingBag: lr must be finite"):
        m(idx, off).sum().backward()
    assert torch.equal(m.weights[0], before) and int(m.optimizer_step) == 3


def test_fused_module_checks_its_hyper_parameters_and_seed():
    """Hyper-parameters and the seed are checked when the module is built, naming the argument (a seed
    past int64 crashed the C++ backward with a pybind error, a tensor lr reached a Triton kernel as a
    pointer); one-element tensors and numpy numbers are read as numbers (bug hunt)."""
    build = lambda **kw: MultiTableEmbeddingBag([(10, 4)], optimizer="adam", **kw)  # noqa: E731
    for kw, name in [({"seed": 2**63}, "seed"), ({"seed": -1}, "seed"), ({"seed": True}, "seed"),
                     ({"seed": 1.5}, "seed"), ({"lr": -0.1}, "lr"), ({"lr": float("nan")}, "lr"),
                     ({"lr": "0.1"}, "lr"), ({"eps": True}, "eps"), ({"beta1": 1.0}, "beta1"),
                     ({"beta2": -0.5}, "beta2"), ({"weight_decay": float("inf")}, "weight_decay")]:
        with pytest.raises((ValueError, TypeError), match=f"MultiTableEmbeddingBag: {name} must be"):
            build(**kw)  # (TypeError for a str or bool, as every real-number argument: kfuse._checks.real)
    with pytest.raises(ValueError, match=r"^feature_table_map must be .* \[0, 1\); got \[1\]"):  # its own name
        MultiTableEmbeddingBag([(10, 4)], feature_table_map=[1])
    m = build(lr=torch.tensor(0.1), beta1=np.float32(0.5), seed=np.int64(2**63 - 1))
    assert m.hparams["lr"] == pytest.approx(0.1) and m.hparams["beta1"] == 0.5 and m.seed == 2**63 - 1


@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("triton", marks=pytest.mark.interpret)])
def test_fused_step_count_moves_with_the_tables_only(backend, seed):
    """A tensor lr runs as the number it holds, on every backend; a backward that fails (a seed made
    invalid after construction) leaves both the tables and the step count as they were: the count
    was increased before the update (bug hunt). A table of another layout, loaded with assign=True,
    is refused by the fused forward as by the op, not by one backend's kernel."""
    idx, off = torch.tensor([1, 2, 2]), torch.tensor([0, 2, 3])
    ms = [MultiTableEmbeddingBag([(10, 4)], optimizer="sgd", lr=lr, seed=3, backend=backend)
          for lr in (torch.tensor(0.5), 0.5)]
    ms[1].load_state_dict(ms[0].state_dict())
    for m in ms:
        m(idx, off).square().sum().backward()
    assert torch.equal(ms[0].weights[0], ms[1].weights[0]) and int(ms[0].optimizer_step) == 1
    m = ms[0]
    m.seed = 2**64  # past what the kernels take: refused (ValueError) before anything changes
    before = m.weights[0].detach().clone()
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        m(idx, off).sum().backward()
    assert int(m.optimizer_step) == 1 and torch.equal(m.weights[0], before)
    m.seed = 3
    m.load_state_dict({"weights.0": torch.randn(4, 10).t()}, strict=False, assign=True)
    with pytest.raises(ValueError, match=r"weights\[0\] must be contiguous"):
        m(idx, off)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fused_module_under_create_graph_and_batched_backwards(backend, seed):
    """With a fused optimizer: the gradient of per_sample_weights taken with create_graph=True had no graph on
    the cpu backend, so a second derivative through it silently lost the lookup's part (0.085 off); a batched
    backward (is_grads_batched=True) failed reading the batched gradient's memory (function-transforms hunt,
    2026-12-07). The first is the plain lookup's second derivative; the second is refused by name, unchanged."""
    torch.manual_seed(seed)
    d = torch.float64
    m = MultiTableEmbeddingBag([(6, 3), (5, 2)], mode="sum", dtype=d, optimizer="sgd", lr=0.1, backend=backend)
    idx, off, psw0 = torch.tensor([0, 2, 5, 1, 4, 3]), torch.tensor([0, 2, 3, 5, 6]), torch.randn(6, dtype=d)
    tables = [w.detach().clone() for w in m.weights]

    def plain(psw):  # the same lookup as matrix products (F.embedding_bag has no double backward)
        pos = torch.arange(6)
        member = ((pos >= off[:-1, None]) & (pos < off[1:, None])).to(d) * psw  # [T·B, N] bag weights
        # (other features' positions weigh 0 in a feature's rows: their indices are clamped into its table)
        rows = [member[2 * f:2 * f + 2] @ F.one_hot(idx.clamp(max=w.shape[0] - 1), w.shape[0]).to(d) @ w
                for f, w in enumerate(tables)]
        return torch.cat(rows, 1)

    def second(f):
        psw = psw0.clone().requires_grad_()
        g, = torch.autograd.grad(f(psw).pow(3).sum(), psw, create_graph=True)
        return torch.autograd.grad(g.sum(), psw)[0]

    torch.testing.assert_close(second(lambda p: m(idx, off, p)), second(plain), rtol=1e-12, atol=1e-12)
    psw = psw0.clone().requires_grad_()
    out = m(idx, off, psw)
    with pytest.raises(ValueError, match="MultiTableEmbeddingBag: a batched backward"):
        torch.autograd.grad(out, psw, torch.randn(3, *out.shape, dtype=d), is_grads_batched=True)
    assert int(m.optimizer_step) == 0 and all(torch.equal(w, t) for w, t in zip(m.weights, tables, strict=True))


def test_vmapped_bad_offsets_are_named_by_the_op(seed):
    """vmap over offsets that go down: the op's error was renamed by reading the offsets on the host, which vmap
    refused with its own error (nonzero's dynamic shape) in place of the op's (function-transforms hunt)."""
    w, idx = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 2, 5, 1])
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match="kfuse.embedding_bag: offsets must be non-decreasing"):
            torch.func.vmap(lambda o, backend=backend: kfuse.embedding_bag(idx, w, o, "sum", backend=backend))(
                torch.tensor([[0, 1, 1], [0, 3, 2]]))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_interrupted_anywhere_counts_what_it_did(backend, dtype, seed):
    """A KeyboardInterrupt at every interrupt point in turn (tests/interrupts.py) of a training step with the
    fused Adam: the step count says whether the tables were updated. The count was advanced after the C++
    update returned (cpu), or after Python's writes (reference, and rows all-reduced across processes): an
    interrupt raised in between left the tables updated and the count not, so the next step reused Adam's bias
    correction and (bf16) the rounding seed (process hunt, 2026-12-07). One C++ call now makes the update (or
    the writes) and advances the count."""
    torch.manual_seed(seed)
    proto = MultiTableEmbeddingBag([(12, 5), (7, 3)], optimizer="adam", lr=0.05, seed=1, backend=backend,
                                   dtype=dtype)
    idx, off = torch.tensor([1, 2, 2, 0, 6, 3, 5]), torch.tensor([0, 3, 4, 6, 7])

    def train(m):
        m(idx, off).square().sum().backward()

    after = copy.deepcopy(proto)
    train(after)
    train(after)
    steps = [[w.detach().clone() for w in m.weights] for m in (proto, after)]  # before, after two steps

    def setup():
        m = copy.deepcopy(proto)
        train(m)  # one step done: the second is interrupted, then retried as a training loop would
        return m

    def check(m, interrupted):
        if interrupted and int(m.optimizer_step) == 1:  # not counted: it must not have updated either
            train(m)
        assert int(m.optimizer_step) == 2
        assert all(torch.equal(w, e) for w, e in zip(m.weights, steps[1], strict=True))

    assert not any(torch.equal(a, b) for a, b in zip(*steps, strict=True))
    assert interrupt_each_point(setup, train, check) > 20


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fused_adam_is_adamw_on_the_rows_seen(backend):
    """The fused "adam" is torch.optim.AdamW's step (eps after the bias correction, decoupled weight
    decay) on the rows a step looks up; rows never looked up do not change (AdamW would decay them)."""
    idx, off = torch.tensor([1, 2, 2, 7]), torch.tensor([0, 2, 4])
    hp = dict(lr=0.1, eps=1e-3, weight_decay=0.01)
    m = MultiTableEmbeddingBag([(10, 4)], optimizer="adam", **hp, backend=backend)
    w0 = m.weights[0].detach().clone()
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([ref], **hp)
    for step in range(3):
        scale = 1e-4 if step else 1.0  # tiny gradients: where SparseAdam's eps placement would differ
        m(idx, off).mul(scale).pow(2).sum().backward()
        opt.zero_grad()
        F.embedding_bag(idx, ref, off, mode="sum").mul(scale).pow(2).sum().backward()
        opt.step()
    seen = torch.tensor([1, 2, 7])
    assert_close(m.weights[0].detach()[seen], ref.detach()[seen], torch.float32)
    unseen = torch.tensor([0, 3, 4, 5, 6, 8, 9])
    assert torch.equal(m.weights[0].detach()[unseen], w0[unseen])


def _kjt_case(seed: int):
    """A two-feature module and its jagged input (indices, offsets, per-sample weights)."""
    m = MultiTableEmbeddingBag([(30, 4), (10, 3)], backend="reference")
    gen = torch.Generator().manual_seed(seed)
    idx, off = make_bags(m.tables, m.feature_table_map, 4, gen)
    return m, idx, off, torch.rand(idx.numel(), generator=gen)


def test_multi_table_module_accepts_a_keyed_jagged_tensor(seed):
    class KeyedJaggedTensor:  # the attributes kfuse reads, as torchrec's class has them
        def __init__(self, keys, values, offsets, weights=None):
            self._k, self._v, self._o, self._w = keys, values, offsets, weights

        def keys(self):
            return self._k

        def values(self):
            return self._v

        def offsets(self):
            return self._o

        def weights_or_none(self):
            return self._w

    m, idx, off, w = _kjt_case(seed)
    assert torch.equal(m(KeyedJaggedTensor(["dx", "px"], idx, off)), m(idx, off))
    assert torch.equal(m(KeyedJaggedTensor(["dx", "px"], idx, off, w)), m(idx, off, w))
    with pytest.raises(ValueError, match="3 keys; this module has 2 features"):
        m(KeyedJaggedTensor(["dx", "px", "rx"], idx, off))


def test_multi_table_module_accepts_torchrecs_keyed_jagged_tensor(seed):
    """torchrec's own class, where torchrec is installed (optional, not a test dependency: it pulls fbgemm-gpu's CUDA
    build beside fbgemm-gpu-cpu; checked with torchrec 1.9.2). A skip, not a pass, where it is not."""
    KJT = pytest.importorskip("torchrec.sparse.jagged_tensor").KeyedJaggedTensor
    m, idx, off, w = _kjt_case(seed)
    assert torch.equal(m(KJT(keys=["dx", "px"], values=idx, offsets=off)), m(idx, off))
    assert torch.equal(m(KJT(keys=["dx", "px"], values=idx, lengths=off.diff())), m(idx, off))  # lengths only
    assert torch.equal(m(KJT(keys=["dx", "px"], values=idx, offsets=off, weights=w)), m(idx, off, w))


# ---------------------------------------------------------------- bad input
def _bad(device: str = "cpu"):
    w = [torch.randn(10, 4, device=device), torch.randn(5, 2, device=device)]
    idx, off = torch.tensor([1, 2, 3, 4], device=device), torch.tensor([0, 1, 2, 3, 4], device=device)
    t, ones = functools.partial(torch.tensor, device=device), functools.partial(torch.ones, device=device)
    mb = kfuse.multi_embedding_bag
    return {
        "index too large": (lambda b: mb(w, t([1, 2, 7, 4]), off, backend=b), IndexError,
                            r"^kfuse.multi_embedding_bag: indices\[2\] = 7 is out of range \[0, 5\)"),
        "negative index": (lambda b: mb(w, t([1, -1, 3, 4]), off, backend=b), IndexError,
                           r"^kfuse.multi_embedding_bag: indices\[1\]"),
        "offsets decrease": (lambda b: mb(w, idx, t([0, 2, 1, 3, 4]), backend=b), ValueError,
                             "^kfuse.multi_embedding_bag: offsets must be non-decreasing"),
        "offsets start": (lambda b: mb(w, idx, t([1, 1, 2, 3, 4]), backend=b), ValueError,
                          "^kfuse.multi_embedding_bag: offsets"),
        "offsets end": (lambda b: mb(w, idx, t([0, 1, 2, 3, 3]), backend=b), ValueError,
                        "^kfuse.multi_embedding_bag: offsets"),
        "offsets count": (lambda b: mb(w, idx, off[:4], backend=b), ValueError, "F·B"),
        "psw length": (lambda b: mb(w, idx, off, per_sample_weights=ones(3), backend=b), ValueError,
                       "per_sample_weights"),
        "psw with mean": (lambda b: mb(w, idx, off, mode="mean", per_sample_weights=ones(4), backend=b),
                          ValueError, "mode='sum'"),
        "max mode": (lambda b: mb(w, idx, off, mode="max", backend=b), ValueError, "max"),
        "mixed dtypes": (lambda b: mb([w[0], w[1].double()], idx, off, backend=b), ValueError, r"weights\[1\]"),
        "offsets dtype": (lambda b: mb(w, idx, off.int(), backend=b), TypeError, "offsets"),
        "float indices": (lambda b: mb(w, idx.float(), off, backend=b), ValueError, "indices"),
        "feature_table": (lambda b: mb(w, idx, off, [0, 2], backend=b), ValueError, "feature_table"),
        "device": (lambda b: mb(w, idx.to("meta"), off, backend=b), ValueError, "indices is on meta"),
        "padding": (lambda b: mb(w, idx, off, padding_idx=[0, 9], backend=b), ValueError, "padding_idx"),
        "psw dtype": (lambda b: mb(w, idx, off, per_sample_weights=ones(4, dtype=torch.float64), backend=b),
                      TypeError, "per_sample_weights must have the tables' dtype"),
    }


def _bad_single(device: str = "cpu"):
    """kfuse.embedding_bag's bad input (offsets are bag starts: include_last_offset=False)."""
    w = torch.randn(10, 4, device=device)
    idx, off = torch.tensor([1, 2, 3, 4], device=device), torch.tensor([0, 1, 3], device=device)
    t, ones = functools.partial(torch.tensor, device=device), functools.partial(torch.ones, device=device)
    eb = kfuse.embedding_bag
    return {
        # Named as this op's argument, input (the backends' flat multi-table index is not one).
        "index too large": (lambda b: eb(t([1, 2, 10, 4]), w, off, backend=b), IndexError,
                            r"embedding_bag: input\[2\] = 10 is out of range \[0, 10\) \(weight's rows\)$"),
        "negative index": (lambda b: eb(t([1, -1, 3, 4]), w, off, backend=b), IndexError,
                           r"input\[1\] = -1 is out of range"),
        "2-D index": (lambda b: eb(t([[1, 2], [3, 11]]), w, backend=b), IndexError,
                      r"input\[1, 1\] = 11 is out of range \[0, 10\)"),
        "offsets decrease": (lambda b: eb(idx, w, t([0, 3, 1]), backend=b), ValueError,
                             r"offsets must be non-decreasing: offsets\[2\] = 1 < offsets\[1\] = 3"),
        "offsets start": (lambda b: eb(idx, w, t([1, 3]), backend=b), ValueError,
                          r"offsets(\[0\])? must (start at|be) 0"),
        "offsets past the end": (lambda b: eb(idx, w, t([0, 5]), backend=b), ValueError,
                                 r"offsets\[1\] = 5 is past the end of input \(len 4\)"),
        "offsets float": (lambda b: eb(idx, w, off.float(), backend=b), ValueError, "offsets must be a 1-D int32"),
        "offsets device": (lambda b: eb(idx, w, off.to("meta"), backend=b), ValueError, "offsets is on meta"),
        "psw length": (lambda b: eb(idx, w, off, per_sample_weights=ones(3), backend=b), ValueError,
                       "per_sample_weights must be 1-D with one weight per index"),
        "psw with mean": (lambda b: eb(idx, w, off, mode="mean", per_sample_weights=ones(4), backend=b),
                          ValueError, "per_sample_weights is only supported with mode='sum'"),
        "psw device": (lambda b: eb(idx, w, off, per_sample_weights=ones(4, device="meta"), backend=b),
                       ValueError, "per_sample_weights is on meta"),
        "psw dtype": (lambda b: eb(idx, w, off, per_sample_weights=ones(4, dtype=torch.float16), backend=b),
                      TypeError, "per_sample_weights must have the tables' dtype"),
    }


@pytest.mark.parametrize(("backend", "device"), backends())
@pytest.mark.parametrize(("cases", "name"), [(_bad, n) for n in _bad()] + [(_bad_single, n) for n in _bad_single()],
                         ids=[f"multi-{n}" for n in _bad()] + [f"single-{n}" for n in _bad_single()])
def test_bad_input_names_the_argument(backend, device, cases, name):
    """multi_embedding_bag (_bad) and the single-table embedding_bag (_bad_single)."""
    fn, exc, words = cases(device)[name]
    with pytest.raises(exc, match=words):
        fn(backend)


# ---------------------------------------------------------------- autograd, registration, compile
@pytest.mark.parametrize(("backend", "device"), backends(torch.float64))
def test_gradcheck(backend, device, seed):
    gen = torch.Generator().manual_seed(seed)
    tables, ft = [(12, 3), (7, 2)], [0, 1, 0]
    weights = [torch.randn(r, d, generator=gen, dtype=torch.float64, requires_grad=True) for r, d in tables]
    idx, off = make_bags(tables, ft, 3, gen, max_bag=4)
    psw = torch.randn(idx.numel(), generator=gen, dtype=torch.float64, requires_grad=True)
    fn = lambda p, *ws: kfuse.multi_embedding_bag(list(ws), idx, off, ft, "sum", p, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (psw, *weights))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("case", ["sum-psw", "mean-padding", "sum-padding"])
def test_opcheck(backend, case, seed):
    gen = torch.Generator().manual_seed(seed)
    tables, ft = [(12, 3), (7, 2)], [0, 1, 0]
    weights = [torch.randn(r, d, generator=gen, requires_grad=True) for r, d in tables]
    padding = [None, 1] if case.endswith("padding") else None  # padding rows among the indices
    idx, off = make_bags(tables, ft, 3, gen, empty=0.0, padding=padding)
    pooling = int(case.startswith("mean"))
    psw = None if pooling else torch.randn(idx.numel(), generator=gen, requires_grad=True)
    torch.library.opcheck(E.embedding_bag_forward, (weights, idx, off, ft, [-1, 1], pooling, psw, backend))
    g = torch.randn(3, 8)
    plain = [w.detach() for w in weights]  # a backward op: no double backward
    torch.library.opcheck(E.embedding_bag_backward, (g, plain, idx, off, ft, [-1, 1], pooling,
                                                     None if psw is None else psw.detach(), psw is not None, backend))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_torch_compile_fullgraph(backend, seed):
    """Compiled whole, the same output and gradients as eager, on the kernels and on the reference: compiled, the
    reference broke the graph at every feature's slice of the offsets (fullgraph=True refused 2 features on) and
    skipped its value checks, so offsets going down gave wrong bags, silently (compile hunt, 2026-12-07)."""
    gen = torch.Generator().manual_seed(seed)
    tables, ft = [(12, 3), (7, 2)], [0, 1, 0]
    weights = [torch.randn(r, d, generator=gen, requires_grad=True) for r, d in tables]
    idx, off = make_bags(tables, ft, 3, gen)

    def f(ws, idx, off):
        return kfuse.multi_embedding_bag(ws, idx, off, ft, "mean", backend=backend).sum() * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    got = compiled(weights, idx, off)
    (g_got,) = torch.autograd.grad(got, weights[0])
    want = f(weights, idx, off)
    (g_want,) = torch.autograd.grad(want, weights[0])
    assert torch.equal(got, want)
    # (the reference's gradient: by autograd eagerly, by the registered backward compiled; other rounding)
    torch.testing.assert_close(g_got, g_want, rtol=0 if backend == "auto" else 1e-6, atol=0)
    bad = off.clone()
    bad[2] = bad[1] - 1
    with pytest.raises(Exception, match="offsets must be non-decreasing"):
        compiled(weights, idx, bad)
    if backend == "reference":
        return
    # A tensor feature_table (taken eagerly): its values are unknown while tracing (Dynamo's data-dependent guard
    # error from .tolist(); compile hunt), said plainly
    with pytest.raises(Exception, match="feature_table must be a list of ints under torch.compile"):
        torch.compile(lambda i, o: kfuse.multi_embedding_bag(weights, i, o, torch.tensor(ft)), fullgraph=True,
                      backend="eager")(idx, off)
    # The module compiles whole and quietly: Dynamo warned about its functools.lru_cache'd key lookup, an error
    # under -W error (feature-combination hunt).
    # Nor with a second graph: a dict of keys filled while tracing was guarded on (review).
    m = MultiTableEmbeddingBag(tables, ft, "mean")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            assert torch.equal(compiled(idx, off), m(idx, off))
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compiled_errors_name_the_public_ops_arguments(backend):
    """Under torch.compile the registered op raises when the graph runs, outside the public op's renaming:
    kfuse.embedding_bag named the flat indices of a 2-D input, and the offset it appends itself as out of order
    (fuzz, 2026-12-08). Its errors, and multi_embedding_bag's op name, are now the eager call's."""
    w = torch.randn(10, 4)

    def errors(fn, *args) -> str:
        with pytest.raises((ValueError, IndexError)) as err:
            fn(*args)
        return f"{err.type.__name__}: {err.value}"

    cases = [  # (the op's call, a good input compiled first, bad inputs)
        (lambda i, o: kfuse.embedding_bag(i, w, o, mode="sum", backend=backend), ([1, 2, 9], [0, 1]),
         [([1, 2, 9], [0, 5]), ([1, 2, 10], [0, 1]), ([1, 2, 3], [0, 2, 1]), ([1, -1, 3], [0, 2])]),
        (lambda i, o: kfuse.embedding_bag(i, w, o, mode="sum", include_last_offset=True, backend=backend),
         ([1, 2, 9], [0, 1, 3]), [([1, 2, 9], [0, 1, 5]), ([1, 2, 10], [0, 1, 3])]),
        (lambda i, o: kfuse.multi_embedding_bag([w], i, o, backend=backend), ([1, 2, 9], [0, 1, 3]),
         [([1, 2, 10], [0, 1, 3]), ([1, 2, 9], [0, 2, 1])]),
    ]
    for fn, good, bad in cases:
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="eager")
        compiled(*map(torch.tensor, good))
        for args in bad:
            eager = errors(fn, *map(torch.tensor, args))
            assert "embedding_bag_forward" not in eager
            assert errors(compiled, *map(torch.tensor, args)) == eager, args
    torch._dynamo.reset()
    two_d = torch.compile(lambda i: kfuse.embedding_bag(i, w, mode="sum", backend=backend), fullgraph=True,
                          backend="eager")
    two_d(torch.tensor([[1, 2], [3, 4]]))
    bad = torch.tensor([[1, 2], [10, 4]])
    eager = errors(lambda i: kfuse.embedding_bag(i, w, mode="sum", backend=backend), bad)
    assert "input[1, 0] = 10" in eager and errors(two_d, bad) == eager


def test_compiled_autograd_records_the_registered_backward(seed):
    """An eager call whose backward compiled autograd traces with fullgraph=True (as DEU's and LoRA's):
    the graph records the registered backward op, not the pybind kernel Dynamo cannot trace; the
    gradients (tables and per_sample_weights) are the eager backward's bits (bug hunt)."""
    gen = torch.Generator().manual_seed(seed)
    tables, ft = [(12, 3), (7, 2)], [0, 1, 0]
    idx, off = make_bags(tables, ft, 3, gen)
    weights = [torch.randn(r, d, generator=gen, requires_grad=True) for r, d in tables]
    psw = torch.rand(idx.numel(), generator=gen, requires_grad=True)

    def loss():
        return kfuse.multi_embedding_bag(weights, idx, off, ft, "sum", psw).square().sum()

    want = torch.autograd.grad(loss(), [*weights, psw])
    torch._dynamo.reset()
    out = loss()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
        out.backward()
    for g, w in zip([*(w.grad for w in weights), psw.grad], want, strict=True):
        assert torch.equal(g, w)


def test_fused_step_without_process_group_warns_under_distributed(monkeypatch, seed):
    """Under DistributedDataParallel a fused module without process_group= trained each rank on its own,
    silently (the anchor's empty gradient satisfies DDP; bug hunt): one warning per module once
    torch.distributed runs several processes (stubbed here), none in a single process."""
    def step(m):
        m(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3])).sum().backward()

    m = MultiTableEmbeddingBag([(8, 4)], optimizer="sgd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(m)  # no process group at all
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.warns(UserWarning, match="ranks' tables drift apart"):
        step(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(m)  # once per module


def test_torch_func_over_indices_and_sparse_reference(seed):
    """vmap over the indices failed in the host-side checks (nonzero of a batched tensor), and
    torch.func.grad of a sparse=True call on the reference backend crashed in its autograd.Function (bug
    hunt). vmap now checks each batch entry's values and matches a loop; grad gives the dense gradient,
    as on the CPU backend."""
    w = torch.randn(10, 4)
    off = torch.tensor([0, 3, 3, 6])
    idx = torch.stack([torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]), torch.tensor([0, 0, 7, 1, 2, 3, 8, 6])])
    want = torch.stack([F.embedding_bag(i, w, off, mode="sum") for i in idx])
    for backend in ("cpu", "reference"):
        got = torch.func.vmap(lambda i, b=backend: kfuse.embedding_bag(i, w, off, mode="sum", backend=b))(idx)
        torch.testing.assert_close(got, want)
        with pytest.raises(IndexError, match=r"input\[7\] = 12 is out of range"):
            torch.func.vmap(lambda i, b=backend: kfuse.embedding_bag(i, w, off, backend=b))(idx + 3)
        g = torch.func.grad(lambda v, b=backend: kfuse.embedding_bag(idx[0], v, off, sparse=True, backend=b).sum())(w)
        torch.testing.assert_close(g, torch.func.grad(lambda v: F.embedding_bag(idx[0], v, off).sum())(w))


def test_vmap_over_offsets_matches_torch_or_names_offsets(seed):
    """vmap over the offsets failed with functorch's ".item()" error from inside the reference (which sliced the
    features by their offsets' values; func hunt). One feature needs no slicing and matches torch's
    embedding_bag under the same vmap (with per_sample_weights too); several features raise an error naming
    offsets."""
    w = torch.randn(10, 3, dtype=torch.float64)
    idx, psw = torch.tensor([1, 2, 3, 4, 5, 0, 9]), torch.rand(7, dtype=torch.float64)
    offs = torch.tensor([[0, 2, 2, 5], [0, 1, 3, 6]])
    for mode, p in (("mean", None), ("sum", psw)):
        want = torch.func.vmap(lambda o, m=mode, p=p: F.embedding_bag(idx, w, o, mode=m, per_sample_weights=p))(offs)
        for backend in ("cpu", "reference"):
            got = torch.func.vmap(lambda o, m=mode, p=p, b=backend: kfuse.embedding_bag(
                idx, w, o, mode=m, per_sample_weights=p, backend=b))(offs)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    two = torch.tensor([[0, 2, 4, 7], [0, 1, 3, 7]])  # 3 features of one table, a bag each
    with pytest.raises(ValueError, match="vmap over offsets needs one feature"):
        torch.func.vmap(lambda o: kfuse.multi_embedding_bag([w], idx, o, [0, 0, 0]))(two)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_a_table_updated_between_forward_and_backward_gets_its_gradient(backend, sparse, seed):
    """Without a per_sample_weights gradient the tables' values are not needed by the backward: a table updated
    in place between forward and backward (another optimizer's step on a shared table) gets its gradient, as
    with torch's embedding_bag (the cpu backend saved the tables and refused it; func hunt). With one, the
    values are read and autograd's in-place error stands on the cpu backend (the reference saved float64
    copies, whose values are the forward's). A computed table is still saved: saved-tensor hooks see it (and
    checkpointing and the end of the backward free it), where kept on ctx it lived as long as the output
    (review)."""
    idx, off, psw = torch.tensor([1, 2, 3, 4, 2]), torch.tensor([0, 2]), torch.rand(5)
    for p in (None, psw):
        w, wt = torch.randn(10, 3, requires_grad=True), torch.randn(10, 3, requires_grad=True)
        y = kfuse.embedding_bag(idx, w, off, mode="sum", per_sample_weights=p, sparse=sparse, backend=backend)
        yt = F.embedding_bag(idx, wt, off, mode="sum", per_sample_weights=p)
        with torch.no_grad():
            w.mul_(2)
            wt.mul_(2)
        g = torch.randn_like(yt)
        y.backward(g)
        yt.backward(g)
        torch.testing.assert_close(w.grad.to_dense(), wt.grad)
    if backend == "reference":
        return
    w = torch.randn(10, 3, requires_grad=True)
    y = kfuse.embedding_bag(idx, w, off, mode="sum", per_sample_weights=psw.requires_grad_(), sparse=sparse,
                            backend=backend)
    with torch.no_grad():
        w.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(tuple(t.shape)) or t, lambda t: t):
        kfuse.embedding_bag(idx, w * 2, off, mode="sum", sparse=sparse, backend=backend).sum().backward()
    assert (10, 3) in packed, packed


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fused_update_is_seen_by_autograd_version_checks(backend, seed):
    """The fused update writes the tables outside autograd's sight: a node of the same graph that saved a
    table before the module's call (h @ W.t()) then built its gradient from the updated table, silently;
    and the per_sample_weights gradient used tables edited between forward and backward (in-place hunt,
    2026-12-05). Both raise torch's in-place error now, as the module with optimizer=None does; the
    tied-embedding order (the module first) trains as before."""
    gen = torch.Generator().manual_seed(seed)
    idx, off = torch.tensor([1, 2, 3, 0, 4]), torch.tensor([0, 2, 3, 5])
    m = MultiTableEmbeddingBag([(6, 4)], [0, 0, 0], optimizer="sgd", lr=10.0, backend=backend)
    h = torch.randn(3, 4, generator=gen, requires_grad=True)
    scores = h @ m.weights[0].t()  # saves the table, before the module's call
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (scores.sum() + m(idx, off).sum()).backward()
    y = m(idx, off)  # the module first: its backward runs after the table's other use
    w0 = m.weights[0].detach().clone()
    (y.sum() + (h @ m.weights[0].t()).sum()).backward()
    assert not torch.equal(m.weights[0], w0), "nothing was trained"
    psw = torch.rand(5, generator=gen, requires_grad=True)
    y = m(idx, off, psw)
    with torch.no_grad():
        m.weights[0].mul_(3.0)
    with pytest.raises(RuntimeError, match="modified in place since"):
        y.sum().backward()
    # Tables made under inference mode have no version counter: serving with per_sample_weights reads none
    # (a first version of the check read them at every forward and failed there; review).
    with torch.inference_mode():
        served = MultiTableEmbeddingBag([(6, 4)], [0, 0, 0], optimizer="sgd", backend=backend)
        want = served(idx, off, psw.detach())
    assert torch.equal(served(idx, off, psw.detach()), want)


@pytest.mark.parametrize("optimizer", [None, "sgd"])
def test_modules_built_under_inference_mode_train_outside_it(seed, optimizer):
    """As torch.nn.EmbeddingBag: built under inference_mode, trained outside it. The fused module's tables,
    states and gradient anchor were inference tensors: the backward ran, the anchor's view tracked no
    gradient, and the tables never changed (optimizer_step stayed 0), silently; optimizer=None (and
    kfuse.nn.EmbeddingBag) failed saving the tables for backward (globals hunt)."""
    idx, off = torch.tensor([0, 2, 1, 3, 3]), torch.tensor([0, 2, 5])
    with torch.inference_mode():
        m = MultiTableEmbeddingBag([(5, 4)], optimizer=optimizer, lr=0.1, backend="cpu")
        bag = kfuse.nn.EmbeddingBag(5, 4, mode="sum", backend="cpu")
    w0 = m.weights[0].detach().clone()
    m(idx, off).square().sum().backward()
    bag(idx, off).sum().backward()
    assert torch.equal(bag.weight.grad, torch.tensor([1.0, 1, 1, 2, 0])[:, None].expand(5, 4))
    if optimizer is None:
        assert m.weights[0].grad is not None and m.weights[0].grad.abs().sum() > 0
    else:
        assert not torch.equal(m.weights[0], w0) and int(m.optimizer_step) == 1
    # Weights passed in are used as they are, inference tensors too (served weights loaded under inference
    # mode: a first version of this fix made every kfuse.nn.EmbeddingBag constructor refuse them; review).
    with torch.inference_mode():
        w = torch.randn(5, 4)
        for built in (kfuse.nn.EmbeddingBag.from_pretrained(w, mode="sum", backend="cpu"),
                      kfuse.nn.EmbeddingBag.from_pretrained(w, freeze=False, mode="sum", backend="cpu"),
                      kfuse.nn.EmbeddingBag(5, 4, mode="sum", _weight=w, backend="cpu"),
                      kfuse.nn.EmbeddingBag.from_torch(torch.nn.EmbeddingBag.from_pretrained(w, mode="sum"),
                                                       backend="cpu")):
            assert torch.equal(built(idx, off), F.embedding_bag(idx, w, off, mode="sum"))


def test_fused_module_loaded_with_assign_under_inference_mode_trains_outside_it(seed):
    """load_state_dict(assign=True) under inference_mode builds a new gradient anchor beside the assigned tables:
    it was an inference tensor, so the fused optimizer never ran afterwards (optimizer_step stayed 0, the tables
    unchanged, nothing said; inference hunt, 2026-12-07)."""
    torch.manual_seed(seed)
    tables = [(10, 4), (6, 3)]
    sd = MultiTableEmbeddingBag(tables, optimizer="sgd", lr=0.1).state_dict()
    m = MultiTableEmbeddingBag(tables, optimizer="sgd", lr=0.1)
    with torch.inference_mode():
        m.load_state_dict(sd, assign=True)
    assert not any(t.is_inference() for t in (*m.parameters(), *m.buffers()))
    w0 = m.weights[0].detach().clone()
    m(torch.tensor([1, 2, 3, 0, 5, 4]), torch.tensor([0, 2, 3, 5, 6])).square().sum().backward()
    assert int(m.optimizer_step) == 1 and not torch.equal(m.weights[0], w0)


def test_fused_optimizer_refuses_capture_and_compiles_with_a_graph_break(seed):
    """make_fx, non-strict export and fake tensors recorded one torch.empty for the fused module (its
    kernel reads raw pointers), which then returned uninitialised memory (bug hunt): a clear error now, as
    for strict export, which failed naming kfuse's internals (export hunt).
    torch.compile (not fullgraph) still breaks the graph there and trains as eager, without recompiling each step."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415
    from torch.fx.experimental.proxy_tensor import make_fx  # noqa: PLC0415

    def build():
        torch.manual_seed(seed)
        return MultiTableEmbeddingBag([(20, 8), (9, 8)], optimizer="rowwise_adagrad", lr=0.1)

    idx, off = torch.tensor([1, 2, 2, 5, 0, 3]), torch.tensor([0, 2, 3, 4, 6])
    m = build()
    with pytest.raises(RuntimeError, match="runs eagerly only"):
        make_fx(lambda i, o: m(i, o))(idx, off)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match="runs eagerly only"):
        m(mode.from_tensor(idx), mode.from_tensor(off))
    # Strict export (Dynamo, no graph break): it failed on a torch.compiler.disable'd internal check instead
    torch._dynamo.reset()
    with pytest.raises(Exception, match="runs eagerly only"):
        torch.export.export(m, (idx, off), strict=True)
    for dynamic in (None, True):
        eager, compiled = build(), build()
        torch._dynamo.reset()
        counters = torch._dynamo.utils.counters
        counters.clear()
        step = torch.compile(lambda mod: mod(idx, off).square().sum().backward(), backend="eager",
                             dynamic=dynamic)
        graphs = []
        for _ in range(4):
            eager(idx, off).square().sum().backward()
            step(compiled)
            graphs.append(counters["stats"]["unique_graphs"])
        for a, b in zip(eager.weights, compiled.weights, strict=True):
            assert torch.equal(a, b)
        # The same batch each step: no graph after the second step's (torch 2.11 adds one there, 2.14 none). With
        # dynamic=True Dynamo traced the backward in pieces and recompiled one of them every step (8, 9, 10, 11;
        # dynamic-shapes hunt, 2026-12-06).
        assert graphs[2:] == graphs[1:2] * 2, (dynamic, graphs)


def test_compiled_fused_step_compiles_nothing_of_what_dynamo_must_skip():
    """The fused optimizer's backward and its aliasing check run eagerly under torch.compile: Dynamo keeps no compiled
    code for them, nor for a wrapper around them. A wrapper of kfuse's own (so that ``import kfuse`` would not load
    Dynamo; review, 2026-12-06) was traced by Dynamo: three more compiled frames a step, and one code object for all
    it wrapped, recompiled per module and grad mode until Dynamo's recompile limit (8 fused modules). (Private torch
    API, in torch 2.11 to 2.14: the cache entries Dynamo keeps on a code object.)"""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list  # noqa: PLC0415

    from kfuse.nn import embedding as nn_emb  # noqa: PLC0415

    step = torch.compile(lambda mod, i, o: mod(i, o).square().sum().backward(), backend="eager")
    torch._dynamo.reset()
    for n in (1, 2):
        m = MultiTableEmbeddingBag([(20, 8)] * n, optimizer="sgd", lr=0.1)
        twin = MultiTableEmbeddingBag([(20, 8)] * n, optimizer="sgd", lr=0.1)
        twin.load_state_dict(m.state_dict())
        i, o = torch.tensor([1, 2] * n), torch.arange(0, 2 * n + 1, 2)
        for _ in range(2):
            step(m, i, o)
            twin(i, o).square().sum().backward()
        for a, b in zip(m.weights, twin.weights, strict=True):
            assert torch.equal(a, b)
    for fn in (nn_emb._FusedEmbeddingBag.backward, nn_emb._check_unaliased):
        while fn is not None:  # the function and every wrapper around it
            assert not _debug_get_cache_entry_list(fn.__code__), fn.__qualname__
            fn = getattr(fn, "__wrapped__", None)


def test_torch_compile_inductor_module(seed):
    """The module (no fused optimizer) under torch.compile's default backend, Inductor, fullgraph:
    forward and backward as eager. One small case: compiling takes seconds on 2 cores."""
    gen = torch.Generator().manual_seed(seed)
    m = MultiTableEmbeddingBag([(12, 3), (7, 2)], [0, 1, 0], mode="mean", padding_idx=[None, 1])
    idx, off = make_bags(m.tables, m.feature_table_map, 3, gen, padding=[None, 1])

    def f(idx, off):
        return (m(idx, off) * 2).sum()

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(idx, off)
    g_got = torch.autograd.grad(got, list(m.weights))
    want = f(idx, off)
    g_want = torch.autograd.grad(want, list(m.weights))
    assert_close(got, want, torch.float32, "forward")
    for a, b in zip(g_got, g_want, strict=True):
        assert_close(a, b, torch.float32, "grad")


# ---------------------------------------------------------------- data parallel (2 processes, gloo)
_DDP_TABLES, _DDP_FT = [(40, 6), (25, 4)], [0, 1, 0]


def _ddp_batch(step: int, rank: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randint(0, 25, (24,), generator=g), torch.arange(0, 25, 4)  # 3 features × 2 bags of 4


def _ddp_module(mode: str, group=None):
    torch.manual_seed(0)
    if mode == "ddp-sparse":  # one table, sparse gradients (DDP takes them from torch's EmbeddingBag kind only)
        return kfuse.nn.EmbeddingBag(25, 4, mode="sum", sparse=True)
    return MultiTableEmbeddingBag(_DDP_TABLES, _DDP_FT, optimizer="rowwise_adagrad" if mode == "fused" else None,
                                  lr=0.1, process_group=group)


def _ddp_tables(m) -> list[torch.Tensor]:
    return list(m.weights) if isinstance(m, MultiTableEmbeddingBag) else [m.weight]


def _ddp_step(m, idx: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """The loss of one batch of _ddp_batch: the single-table module takes its 6 bags' starts."""
    return (m(idx, off[:-1] if isinstance(m, kfuse.nn.EmbeddingBag) else off) ** 2).sum()


_DDP = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    sys.path.insert(0, sys.argv[4])
    from test_embedding import _ddp_batch, _ddp_module, _ddp_step, _ddp_tables
    rank, mode, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", rank=rank, world_size=2)
    fused = mode == "fused"
    m = _ddp_module(mode, dist.group.WORLD if fused else None)
    model = m if fused else DDP(m)
    opt = None if fused else (torch.optim.SGD if mode == "ddp-sparse" else torch.optim.Adagrad)(model.parameters(),
                                                                                                lr=0.1)
    for step in range(3):
        _ddp_step(model, *_ddp_batch(step, rank)).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
    torch.save([w.detach() for w in _ddp_tables(m)], out)
    if fused:  # a group without this process (torch gives its size as -1) is refused by name
        outsider = dist.new_group([1])
        if rank == 0:
            try:
                _ddp_module(mode, outsider)
                raise AssertionError("a process_group without this rank was accepted")
            except ValueError as e:
                assert "process_group does not include this process" in str(e), e
    dist.barrier()
    del model, m, opt  # nothing may hold the process group past its destruction
    dist.destroy_process_group()
""")


_PG_COPY = textwrap.dedent("""
    import copy, io, torch, torch.distributed as dist
    from kfuse.nn import MultiTableEmbeddingBag
    dist.init_process_group("gloo", rank=0, world_size=1)
    group = dist.new_group([0])
    try:  # without a fused optimizer nothing would read it: ranks trained unsynchronised, silently (drop-in hunt)
        MultiTableEmbeddingBag([(6, 3)], process_group=group)
        raise AssertionError("a process group without a fused optimizer was taken")
    except ValueError as e:
        assert "process_group is the fused optimizer's" in str(e), e
    m = MultiTableEmbeddingBag([(6, 3)], optimizer="sgd", lr=0.1, process_group=group)
    idx, off = torch.tensor([0, 2, 3]), torch.tensor([0, 2, 3])
    m(idx, off).sum().backward()
    twin = copy.deepcopy(m)
    assert twin.process_group is group and torch.equal(twin.weights[0], m.weights[0])
    assert copy.copy(m).process_group is group
    twin(idx, off).sum().backward()
    assert not torch.equal(twin.weights[0], m.weights[0]), "the copy's tables are the original's"
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert back.process_group is None and m.process_group is group and torch.equal(back.weights[0], m.weights[0])
    del m, twin, back
    dist.destroy_process_group()
    print("ok")
""")


def test_a_module_with_a_process_group_copies_and_pickles(tmp_path):
    """A process group neither pickles nor copies, so deepcopy, pickle and torch.save of a module given one
    failed ("cannot pickle ProcessGroup"; copy hunt): a deep copy shares the group and trains its own
    tables; a pickled module leaves the group out, as DistributedDataParallel does. (One gloo process.)"""
    assert gloo.run_one(_PG_COPY, tmp_path).strip() == "ok"


_FSDP = textwrap.dedent("""
    import warnings
    import torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from kfuse.nn import MultiTableEmbeddingBag
    warnings.filterwarnings("ignore")  # (FSDP's own, on the CPU)
    dist.init_process_group("gloo", rank=0, world_size=1)

    class Model(nn.Module):
        def __init__(self, optimizer):
            super().__init__()
            self.emb, self.head = MultiTableEmbeddingBag([(9, 4), (7, 4)], optimizer=optimizer, lr=0.1), nn.Linear(8, 1)

        def forward(self, i, o):
            return self.head(self.emb(i, o))

    idx, off = torch.tensor([1, 2, 3, 0, 5, 6]), torch.tensor([0, 2, 3, 4, 6])
    for wrap in (fully_shard, lambda m: FullyShardedDataParallel(m, use_orig_params=True,
                                                                  device_id=torch.device("cpu"))):
        model = wrap(Model("sgd"))
        try:
            model(idx, off).sum().backward()
            raise AssertionError("a fused optimizer under FSDP was accepted")
        except RuntimeError as e:
            assert "FullyShardedDataParallel (fully_shard or FSDP) shards them" in str(e), e
        assert int(model.emb.optimizer_step) == 0
    # Left out of FSDP (its advice): the fused optimizer trains it.
    for wrap in (lambda m: fully_shard(m, ignored_params=set(m.emb.parameters())),
                 lambda m: FullyShardedDataParallel(m, use_orig_params=True, device_id=torch.device("cpu"),
                                                    ignored_modules=[m.emb])):
        model = wrap(Model("sgd"))
        before = model.emb.weights[0].detach().clone()
        model(idx, off).sum().backward()
        assert int(model.emb.optimizer_step) == 1 and not torch.equal(model.emb.weights[0], before)
    model = fully_shard(Model(None))  # no fused optimizer: FSDP's own business
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.emb.weights[0].full_tensor().clone()
    model(idx, off).sum().backward()
    opt.step()
    assert not torch.equal(model.emb.weights[0].full_tensor(), before)
    del model, opt
    dist.destroy_process_group()
    print("ok")
""")


def test_fused_optimizer_refuses_fsdp(tmp_path):
    """FullyShardedDataParallel shards the tables and gathers copies for each forward and backward: the fused
    update went into the copies, which FSDP frees, so FSDP (use_orig_params) trained nothing, silently, and
    fully_shard failed inside torch (FSDP hunt, 2026-12-06). Both are refused by name at the forward; the module
    left out of FSDP (as the error advises) trains with it, and without it under fully_shard. (One gloo process.)"""
    assert gloo.run_one(_FSDP, tmp_path).strip() == "ok"


def test_process_group_must_be_a_process_group():
    """A group given as a name or a number failed at the first backward with "'str' object has no attribute
    'size'" (bad-input hunt); the fused module's process_group is checked when it is built."""
    for bad in ("world", 0):
        with pytest.raises(TypeError, match="process_group must be a torch.distributed process group"):
            MultiTableEmbeddingBag([(6, 3)], optimizer="sgd", process_group=bad)


@pytest.mark.parametrize("mode", ["ddp", "fused", "ddp-sparse"])
def test_data_parallel_two_processes(mode, tmp_path):
    """2 gloo processes, each its own batches: DDP (fused optimizer off; gradients averaged, then
    Adagrad), the fused row-wise Adagrad with its row-sparse gradients all-gathered and summed, and DDP over
    ``kfuse.nn.EmbeddingBag(sparse=True)`` with SGD (DDP takes sparse gradients only from modules that are
    torch's Embedding or EmbeddingBag: kfuse's was not one, and DDP failed on its first backward, "Cannot
    access storage of SparseTensorImpl"; distributed hunt, 2026-12-05). Both ranks end with identical
    tables, equal to one process doing the same arithmetic on both batches (averaged loss for DDP; the
    concatenated batch for the fused optimizer)."""
    script = tmp_path / "ddp.py"
    script.write_text(_DDP)
    env = gloo.env()
    procs = [subprocess.Popen([sys.executable, str(script), str(r), mode, str(tmp_path / f"w{r}.pt"), gloo.TESTS],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [(p.returncode, o[-2000:]) for p, o in zip(procs, outs, strict=True)]
    w0, w1 = torch.load(tmp_path / "w0.pt"), torch.load(tmp_path / "w1.pt")
    fused = mode == "fused"
    m = _ddp_module(mode)
    opt = None if fused else (torch.optim.SGD if mode == "ddp-sparse" else torch.optim.Adagrad)(m.parameters(), lr=0.1)
    start = [w.detach().clone() for w in _ddp_tables(m)]
    for step in range(3):
        (i0, o0), (i1, o1) = _ddp_batch(step, 0), _ddp_batch(step, 1)
        if fused:  # feature-major concatenation: each feature's bags of rank 0, then of rank 1
            idx = torch.cat([torch.cat([i0[o0[2 * f]: o0[2 * f + 2]], i1[o1[2 * f]: o1[2 * f + 2]]]) for f in range(3)])
            (m(idx, torch.arange(0, 49, 4)) ** 2).sum().backward()
        else:
            ((_ddp_step(m, i0, o0) + _ddp_step(m, i1, o1)) / 2).backward()
            opt.step()
            opt.zero_grad()
    for a, b, w, s in zip(w0, w1, _ddp_tables(m), start, strict=True):
        assert torch.equal(a, b), "the ranks' tables differ"
        assert not torch.equal(a, s), "nothing was trained"
        assert_close(a, w, torch.float32, "data parallel vs one process")


# ---------------------------------------------------------------- the C++ kernels (kfuse._C), directly
# The fused optimizers bit for bit against the kernel's own sparse gradient updated op by op in its
# precision (stochastic rounding included), thread-count independence of every backward, and bad
# input that leaves tables and states untouched. ``make_case``: Zipf-heavy duplicates (a cubed
# uniform rank), empty bags, padding on the hottest row, odd dims, two features sharing a table.
_C = _backends.extension()


def make_case(dtype, index_dtype=torch.int64, *, rows=(50, 37, 9), dims=(7, 33, 1), feature_table=(0, 1, 0, 2),
              B=12, max_bag=9, pooling=0, weighted=False, padding=True):
    """Tables, feature-major bags (Zipf-skewed indices, some empty bags) and their arguments."""
    weights = [torch.randn(r, d, dtype=torch.float64).to(dtype) for r, d in zip(rows, dims, strict=True)]
    padding_idx, idx_parts, sizes = [], [], []
    perms = [torch.randperm(r) for r in rows]
    for t in range(len(rows)):  # padding: the hottest row of every other table
        padding_idx.append(int(perms[t][0]) if padding and t % 2 == 0 else -1)
    for f, t in enumerate(feature_table):
        n = torch.randint(0, max_bag + 1, (B,))
        n[torch.rand(B) < 0.2] = 0
        if f == 0:
            n[0] = 0
        sizes.append(n)
        ranks = (torch.rand(int(n.sum())) ** 3 * rows[t]).long()  # heavy head: many duplicates
        idx_parts.append(perms[t][ranks])
    indices = torch.cat(idx_parts).to(index_dtype)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(sizes).cumsum(0)]).to(index_dtype)
    psw = torch.randn(indices.numel(), dtype=acc_dtype(dtype)) if weighted else None
    return dict(weights=weights, indices=indices, offsets=offsets, feature_table=list(feature_table),
                padding_idx=padding_idx, pooling=pooling, per_sample_weights=psw)


def args(c):
    return (c["weights"], c["indices"], c["offsets"], c["feature_table"], c["padding_idx"], c["pooling"],
            c["per_sample_weights"])


def occurrences(c):
    """Per flat position: (feature, bag, table, row, scale) in float64, padding excluded."""
    F_, off = len(c["feature_table"]), c["offsets"].long()
    B = (off.numel() - 1) // F_
    fb = torch.repeat_interleave(torch.arange(F_ * B), off.diff())
    f, b = fb // B, fb % B
    t = torch.tensor(c["feature_table"])[f]
    row = c["indices"].long()
    keep = row != torch.tensor(c["padding_idx"])[t]
    if c["per_sample_weights"] is not None:
        scale = c["per_sample_weights"].double()
    elif c["pooling"] == 1:
        count = torch.zeros(F_ * B).index_add_(0, fb[keep], torch.ones(int(keep.sum())))
        scale = 1.0 / count[fb].clamp(min=1).double()
    else:
        scale = torch.ones(row.numel(), dtype=torch.float64)
    return f, b, t, row, scale, keep, B


def ref_grads(c, grad_out):
    """Dense float64 gradient of each table (index_add_ of the scaled grad_out slices)."""
    f, b, t, row, scale, keep, _ = occurrences(c)
    col = torch.tensor([0] + [c["weights"][tt].shape[1] for tt in c["feature_table"]]).cumsum(0)
    go = grad_out.double()
    dense = []
    for tt, w in enumerate(c["weights"]):
        sel = torch.nonzero(keep & (t == tt)).flatten()
        g = torch.stack([go[b[i], col[f[i]]:col[f[i]] + w.shape[1]] for i in sel.tolist()]) if sel.numel() else \
            torch.zeros(0, w.shape[1], dtype=torch.float64)
        dense.append(torch.zeros(w.shape, dtype=torch.float64).index_add_(0, row[sel], g * scale[sel, None]))
    return dense


def densify(sparse, weights):
    out = []
    for (rows, g), w in zip(sparse, weights, strict=True):
        assert rows.dtype == torch.int64 and torch.all(rows.diff() > 0), "unique rows ascending"
        out.append(torch.zeros(w.shape, dtype=torch.float64).index_put_((rows,), g.double()))
    return out


def test_cpu_kernels_empty_input_and_an_unused_table(seed):
    c = make_case(torch.float32, feature_table=(0, 0, 2), max_bag=0)  # every bag empty, table 1 unused
    out = _C.embedding_forward(*args(c))
    assert torch.equal(out, torch.zeros(12, 7 + 7 + 1))
    sparse = _C.embedding_backward_sparse(torch.ones_like(out), *args(c))
    assert [tuple(g.shape) for _, g in sparse] == [(0, 7), (0, 33), (0, 1)]


@pytest.mark.parametrize("dims", [(128,), (96, 128, 37)], ids=["aligned", "ragged"])
def test_cpu_large_outputs_stream_the_same_bits(seed, dims):
    """Float outputs of at least 1 MiB are written with streaming stores (movntps, csrc: kFwdStreamBytes)
    where rows are 16-byte aligned, on an AMD CPU and for bags of >= 16 indices on average (csrc:
    stream_output; elsewhere this checks regular stores alike); below that, regular stores. A bag's sum
    does not depend on the batch, so the output of B bags (1.5 MiB) equals, bit for bit, the outputs of
    its two halves (< 1 MiB each) side by side; the ragged layout (a 37-wide table: unaligned rows)
    too. Sums of several rows (mean, weighted) and empty bags included."""
    g = torch.Generator().manual_seed(seed)
    B, tables = 3 * (1 << 19) // (4 * sum(dims)), [torch.randn(300, d, generator=g) for d in dims]  # 1.5 MiB
    assert B * sum(dims) * 4 >= 1 << 20 and B // 2 * sum(dims) * 4 < 1 << 20
    counts = torch.randint(16, 25, (len(dims) * B,), generator=g)
    counts[::50] = 0  # empty bags (the average stays above 16)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    idx = torch.randint(0, 300, (int(offsets[-1]),), generator=g)
    fmap = list(range(len(dims)))
    for mode, psw in (("sum", None), ("mean", None), ("sum", torch.rand(idx.numel(), generator=g))):
        whole = kfuse.multi_embedding_bag(tables, idx, offsets, mode=mode, per_sample_weights=psw,
                                          feature_table=fmap, backend="cpu")
        halves = []
        for lo, hi in ((0, B // 2), (B // 2, B)):
            sel = torch.cat([torch.arange(f * B + lo, f * B + hi) for f in range(len(dims))])
            starts, ends = offsets[sel], offsets[sel + 1]
            part = torch.cat([torch.arange(int(a), int(b)) for a, b in zip(starts, ends, strict=True)])
            sub_off = torch.cat([torch.zeros(1, dtype=torch.int64), (ends - starts).cumsum(0)])
            halves.append(kfuse.multi_embedding_bag(tables, idx[part], sub_off, mode=mode, feature_table=fmap,
                                                    per_sample_weights=None if psw is None else psw[part],
                                                    backend="cpu"))
        assert torch.equal(whole, torch.cat(halves)), mode


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [16, 32])
def test_cpu_forward_converts_every_half_exactly(dtype, dim):
    """The CPU kernels convert fp16 with integer ops (csrc/cpu_convert.h) or vcvtph2ps, and bf16 by
    a shift (blocks of 32 columns: a shift and a mask of 32-bit lanes): every one of the 65536 values
    (zeros, subnormals, inf, nan) in a one-row bag is 0 + float(x) rounded back."""
    rows = 65536 // dim
    w = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(rows, dim)
    idx = torch.arange(rows)
    out = _C.embedding_forward([w], idx, torch.arange(rows + 1), [0], [-1], 0, None)
    expect = (torch.zeros(rows, dim) + w.float()).to(dtype)
    assert torch.equal(out.isnan(), expect.isnan())
    assert torch.equal(out.nan_to_num(0.0).view(torch.int16), expect.nan_to_num(0.0).view(torch.int16))


@pytest.mark.parametrize(("pooling", "weighted"), [(0, False), (0, True), (1, False)])  # weights: sum only
def test_cpu_half_tables_sum_as_float_tables(seed, pooling, weighted):
    """fp16 / bf16 tables and gradients are summed converted exactly, in the fp32 kernels' order
    (AVX-512 machines take fp16 through vcvtph2ps, the others through cpu_convert.h's integer form):
    the forward is the fp32 tables' output rounded once, and the sparse gradient (float) equals the
    fp32 one of grad_out converted, bit for bit (odd dims, padding, empty bags)."""
    for dtype in (torch.float16, torch.bfloat16):
        c = make_case(dtype, rows=(50, 37, 9), dims=(16 + 7, 130, 33), pooling=pooling, weighted=weighted)
        out = _C.embedding_forward(*args(c))
        c32 = dict(c, weights=[w.float() for w in c["weights"]])
        expect = _C.embedding_forward(*args(c32)).to(dtype)
        assert torch.equal(out.view(torch.int16), expect.view(torch.int16)), dtype
        grad_out = torch.randn(out.shape).to(dtype)
        got = _C.embedding_backward_sparse(grad_out, *args(c))
        ref = _C.embedding_backward_sparse(grad_out.float(), *args(c32))
        for (rows, g), (rows32, g32) in zip(got, ref, strict=True):
            assert torch.equal(rows, rows32) and torch.equal(g.view(torch.int32), g32.view(torch.int32)), dtype


@pytest.mark.parametrize("dim", [1, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 47, 64, 65, 127, 160, 200])
def test_cpu_forward_sums_every_width_in_blocks(seed, dim):
    """A row is summed in blocks of 128, 64, ... 16 columns (float: vectors of 16; bf16: pairs of columns in 32-bit
    lanes, 32 columns a block), and what is left of it, once the row has 16 columns (8, 4 below), as one more
    block ending at the row's end, over columns summed already (CPU hunt, 2026-12-07: the smaller blocks and a
    scalar tail made a pass each). Every width: float32 against float64, fp16 and bf16 against the float32
    tables' sums rounded once (bit for bit), with padding, empty bags, mean pooling and weights."""
    for pooling, weighted in ((0, False), (1, False), (0, True)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            c = make_case(dtype, rows=(50, 37, 9), dims=(dim, dim + 1, dim), pooling=pooling, weighted=weighted)
            out = _C.embedding_forward(*args(c))
            if dtype == torch.float32:
                ref = multi_embedding_bag_reference(*(args(c)[:3]), c["feature_table"], pooling,
                                                    c["per_sample_weights"], c["padding_idx"])
                assert_close(out, ref, torch.float32, f"dim {dim}")
                continue
            c32 = dict(c, weights=[w.float() for w in c["weights"]])
            expect = _C.embedding_forward(*args(c32)).to(dtype)
            assert torch.equal(out.view(torch.int16), expect.view(torch.int16)), (dim, dtype, pooling, weighted)


def test_cpu_forward_of_few_long_bags_takes_every_thread_with_the_same_bits(seed):
    """64 bags or fewer made one task whatever their length: 32 bags of 1000 indices ran on one thread (2.2x
    torch's time on 2; CPU hunt, 2026-12-07). Long bags now make tasks of fewer bags; a bag is still summed by
    one thread in index order, so the bits do not depend on the thread count."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5000, 40, generator=g)
    idx, off = torch.randint(0, 5000, (32 * 1000,), generator=g), torch.arange(0, 32 * 1000 + 1, 1000)
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(_C.embedding_forward([w], idx, off, [0], [-1], 0, None))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])
    assert_close(outs[0], multi_embedding_bag_reference([w], idx, off, [0], 0, None, [-1]), torch.float32, "long")


def edge_floats(n: int) -> torch.Tensor:
    """n float32s from uniformly random bits (every exponent equally often: subnormals, inf, nan,
    magnitudes past fp16's and bf16's largest) and the values where rounding to fp16 / bf16 changes
    regime: zeros, fp16's subnormal and normal bounds, ties, its largest (65504), the first value that
    rounds to inf (65520) and bf16's largest."""
    bits = torch.randint(-2**31, 2**31, (n,), dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0.0, -0.0, 2**-24, 2**-25, 3 * 2**-26, 2**-14, 2**-14 * (1 - 2**-11), 1 + 2**-11,
                            65504.0, 65519.99, 65520.0, 65536.0, 3.3895314e38, 3.4028235e38, 1e-45,
                            float("inf"), float("nan")])
    return torch.cat([bits.view(torch.float32), special, -special])


@pytest.mark.parametrize(("dtype", "dim"), [(torch.float16, 16), (torch.bfloat16, 16), (torch.bfloat16, 32),
                                            (torch.bfloat16, 7)])
def test_cpu_forward_rounds_floats_to_half_exactly(seed, dtype, dim):
    """The fp16 output conversion (vcvtps2ph on AVX-512 machines, csrc/cpu_convert.h's integer ops
    elsewhere) and bf16's (vector ops in blocks of 16 and 32 columns, scalar below) round every kind of
    float as torch does: per_sample_weights x a row of ones, one index per bag."""
    t = edge_floats(20000)
    w = torch.ones(1, dim, dtype=dtype)
    out = _C.embedding_forward([w], torch.zeros(t.numel(), dtype=torch.int64), torch.arange(t.numel() + 1), [0],
                               [-1], 0, t)
    expect = (torch.zeros(t.numel(), dim) + t[:, None] * 1.0).to(dtype)
    assert torch.equal(out.isnan(), expect.isnan())
    assert torch.equal(out.nan_to_num(0.0).view(torch.int16), expect.nan_to_num(0.0).view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_stochastic_rounding_bits_at_every_magnitude(seed, dtype):
    """The fused update's stochastic rounding (branch-free in embedding_cpu.cpp's sr_bits) equals the
    definition (reference stochastic_round) bit for bit on edge floats: SGD with lr 1 from zero rows
    writes y = per_sample_weight exactly, rounded with 16 random words per value."""
    t = edge_floats(4000)
    n = t.numel()
    c = dict(weights=[torch.zeros(n, 16, dtype=dtype)], indices=torch.arange(n), offsets=torch.arange(n + 1),
             feature_table=[0], padding_idx=[-1], pooling=0, per_sample_weights=t)
    _C.embedding_backward_fused(torch.full((n, 16), -1.0, dtype=dtype), *args(c), "sgd", [], [],
                                1.0, 0.0, 0.0, 0.0, 0.0, 5, 2024)
    g = torch.zeros(n, 16) + t[:, None] * -1.0  # the kernel's float ops, one by one
    y = torch.zeros(n, 16) - 1.0 * (g + 0.0 * torch.zeros(n, 16))
    u = rounding_bits(2024, 5, 0, torch.arange(n)[:, None], torch.arange(16)[None, :])
    expect = stochastic_round(y, dtype, u)
    got = c["weights"][0]
    assert torch.equal(got.isnan(), expect.isnan())
    assert torch.equal(got.nan_to_num(0.0).view(torch.int16), expect.nan_to_num(0.0).view(torch.int16))


def lane_sum16(x):
    """Row sums of x [U, D] in the kernel's order: lane d mod 16 partials, then pairwise halving."""
    p = torch.zeros(x.shape[0], 16, dtype=x.dtype)
    for c0 in range(0, x.shape[1], 16):
        part = x[:, c0:c0 + 16]
        p[:, :part.shape[1]] = p[:, :part.shape[1]] + part
    for w in (8, 4, 2, 1):
        p[:, :w] = p[:, :w] + p[:, w:2 * w]
    return p[:, 0]


def sqrt(x):
    return torch.from_numpy(np.sqrt(x.numpy()))  # correctly rounded (torch's float32 sqrt is within 1 ulp)


def full(like, v):
    return torch.full_like(like, v)  # a tensor operand: no scalar fast path (x / s as x * (1 / s))


def ref_update(w, g, s1, s2, opt, hp, step):
    """One update of rows w [U, D] by their summed gradients g, op by op in w's dtype (the kernel's
    order of operations); returns (w, s1, s2)."""
    lr, eps, b1, b2, wd = (hp[k] for k in ("lr", "eps", "beta1", "beta2", "weight_decay"))
    if opt == "sgd":
        return w - full(w, lr) * (g + full(w, wd) * w), s1, s2
    if opt == "rowwise_adagrad":
        g = g + full(w, wd) * w
        s1 = s1 + lane_sum16(g * g) / full(s1, w.shape[1])
        mult = full(s1, lr) / (sqrt(s1) + full(s1, eps))
        return w - mult[:, None] * g, s1, s2
    m = full(w, b1) * s1 + full(w, 1 - b1) * g
    v = full(w, b2) * s2 + full(w, 1 - b2) * (g * g)  # as reference.embedding.adam_update (1 ulp apart before)
    c1, c2 = full(w, 1 - b1**step), full(w, 1 - b2**step)
    return w - full(w, lr) * ((m / c1) / (sqrt(v / c2) + full(w, eps)) + full(w, wd) * w), m, v


def states_for(opt, weights):
    acc = acc_dtype(weights[0].dtype)
    if opt == "sgd":
        return [], []
    if opt == "rowwise_adagrad":
        return [torch.rand(w.shape[0], dtype=acc) for w in weights], []
    return [torch.randn(w.shape, dtype=acc) * 0.1 for w in weights], [torch.rand(w.shape, dtype=acc) for w in weights]


CPU_HP = dict(lr=0.05, eps=1e-6, beta1=0.9, beta2=0.99, weight_decay=0.01)


def cpu_fused(c, grad_out, opt, s1, s2, step=3, seed=12345):
    hp = CPU_HP
    _C.embedding_backward_fused(grad_out, *args(c), opt, s1, s2, hp["lr"], hp["eps"], hp["beta1"], hp["beta2"],
                                hp["weight_decay"], step, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", ["sgd", "rowwise_adagrad", "adam"])
def test_cpu_fused_optimizer_bits_equal_sparse_grad_then_update(seed, dtype, opt):
    c = make_case(dtype, torch.int32 if opt == "adam" else torch.int64, pooling=int(opt == "sgd"),
                  weighted=opt == "rowwise_adagrad")
    grad_out = torch.randn(12, 48, dtype=torch.float64).to(dtype)
    s1, s2 = states_for(opt, c["weights"])
    before = [w.clone() for w in c["weights"]]
    s1_0, s2_0 = [s.clone() for s in s1], [s.clone() for s in s2]
    sparse = _C.embedding_backward_sparse(grad_out, *args(c))
    cpu_fused(c, grad_out, opt, s1, s2, step=3, seed=-7 if dtype == torch.float16 else 2**40 + 5)
    seed32 = (-7 if dtype == torch.float16 else 2**40 + 5) & 0xFFFFFFFF
    dense_ref = ref_grads(c, grad_out)
    acc = acc_dtype(dtype)
    for t, ((rows, g), w0) in enumerate(zip(sparse, before, strict=True)):
        s1r = s1_0[t][rows] if s1_0 else None
        s2r = s2_0[t][rows] if s2_0 else None
        # Bit for bit: the kernel's own sparse gradient, updated op by op in its precision.
        wa, s1a, s2a = ref_update(w0[rows].to(acc), g, s1r, s2r, opt, CPU_HP, 3)
        u = rounding_bits(seed32, 3, t, rows[:, None], torch.arange(wa.shape[1])[None, :])
        exp_w = wa if dtype in (torch.float32, torch.float64) else stochastic_round(wa, dtype, u)
        got = c["weights"][t]
        assert torch.equal(got[rows].view(torch.uint8), exp_w.to(dtype).view(torch.uint8)), f"table {t} rows"
        untouched = torch.ones(w0.shape[0], dtype=torch.bool).index_fill_(0, rows, False)
        assert torch.equal(got[untouched].view(torch.uint8), w0[untouched].view(torch.uint8))
        if s1:
            assert torch.equal(s1[t][rows], s1a) and torch.equal(s1[t][untouched], s1_0[t][untouched])
        if s2:
            assert torch.equal(s2[t][rows], s2a)
        # Semantics: float64 from the float64 gradient (f32/f64 tables; half tables round randomly).
        if dtype in (torch.float32, torch.float64):
            wd, _, _ = ref_update(w0[rows].double(), dense_ref[t][rows], None if s1r is None else s1r.double(),
                                  None if s2r is None else s2r.double(), opt, CPU_HP, 3)
            assert_close(got[rows], wd, dtype, f"{opt} table {t}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_dense_gradient_is_the_sparse_one_written_in_place(seed, dtype, monkeypatch):
    """The dense backward writes each unique row's sum (the sparse kernel's, bit for bit, rounded to the
    table's dtype) straight into zeroed table-shaped gradients, skipping tables that need none; and the
    public op's dense gradient on the cpu backend never builds the row-sparse copy (whose [U, dim] fp32
    values peaked at 2-2.5x torch's dense backward; memory hunt)."""
    c = make_case(dtype, pooling=1)
    grad_out = torch.randn(12, 48, dtype=torch.float64).to(dtype)
    sparse = _C.embedding_backward_sparse(grad_out, *args(c))
    dense = _C.embedding_backward_dense(grad_out, *args(c), [True, False, True])
    assert dense[1] is None
    for t in (0, 2):
        (rows, g), w = sparse[t], c["weights"][t]
        expect = torch.zeros(w.shape, dtype=dtype).index_copy_(0, rows, g.to(dtype))
        assert dense[t].dtype == dtype and torch.equal(dense[t].view(torch.uint8), expect.view(torch.uint8)), t

    def no_sparse(*a, **k):
        raise AssertionError("the dense gradient built the row-sparse one")

    monkeypatch.setattr(_C, "embedding_backward_sparse", no_sparse)
    ws = [w.clone().requires_grad_(t != 1) for t, w in enumerate(c["weights"])]
    pads = [None if p < 0 else p for p in c["padding_idx"]]
    out = kfuse.multi_embedding_bag(ws, c["indices"], c["offsets"], c["feature_table"], "mean",
                                    padding_idx=pads, backend="cpu")
    out.backward(grad_out)
    assert ws[1].grad is None
    for t in (0, 2):
        assert torch.equal(ws[t].grad.view(torch.uint8), dense[t].view(torch.uint8)), t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dense_gradient_past_2_mib_is_zeroed_accumulates_and_resets(seed, dtype):
    """Dense gradients of 2 MiB or more come from fresh mappings, not at::zeros (bindings.cpp's
    fresh_zeros): every row no bag reads is zero, a second backward accumulates into them, and the
    optimizer's in-place reset and update work on them."""
    rows = (2 << 20) // (129 * dtype.itemsize) + 3  # just past 2 MiB, odd sizes
    m = kfuse.nn.MultiTableEmbeddingBag([(rows, 129), (5, 3)], mode="sum", dtype=dtype)
    ws = m._weights()
    ref = [w.detach().double().requires_grad_() for w in ws]
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        indices = torch.cat([torch.randint(0, rows, (40,), generator=g), torch.randint(0, 5, (40,), generator=g)])
        offsets = torch.arange(0, 81, 4)
        grad_out = torch.randn(10, 132, generator=g).to(dtype)
        m(indices, offsets).backward(grad_out)
        exp = torch.cat([F.embedding_bag(indices[:40], ref[0], offsets[:10], mode="sum"),
                         F.embedding_bag(indices[40:], ref[1], offsets[:10], mode="sum")], 1)
        exp.backward(grad_out.double())
    assert ws[0].grad.untyped_storage().nbytes() >= 2 << 20
    for w, r in zip(ws, ref, strict=True):
        assert w.grad.dtype == dtype and w.grad.shape == w.shape
        assert_close(w.grad, r.grad, dtype, "accumulated gradient")
        assert not w.grad[r.grad.abs().sum(1) == 0].any(), "rows no bag read"
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    before = ws[0].detach().clone()
    opt.step()
    assert_close(ws[0], before.double() - 0.5 * ws[0].grad.double(), dtype, "SGD step")
    opt.zero_grad(set_to_none=False)
    assert not ws[0].grad.any()


def test_cpu_stochastic_rounding_is_unbiased(seed):
    # y halfway-ish between bf16 neighbours: the mean of many independent roundings is y.
    c = make_case(torch.bfloat16, rows=(4,), dims=(256,), feature_table=(0,), B=1, max_bag=1, padding=False)
    c["indices"] = torch.tensor([1])
    c["offsets"] = torch.tensor([0, 1])
    w0 = torch.full((4, 256), 1.0, dtype=torch.bfloat16)
    outs = []
    for step in range(1, 41):
        c["weights"] = [w0.clone()]
        _C.embedding_backward_fused(torch.full((1, 256), 1.0, dtype=torch.bfloat16), *args(c), "sgd", [], [],
                                    1e-3, 0.0, 0.0, 0.0, 0.0, step, 99)
        outs.append(c["weights"][0][1].float())
    mean = torch.stack(outs).mean()
    assert abs(mean.item() - (1.0 - 1e-3)) < 2e-4  # nearest rounding would give exactly 1.0


@pytest.mark.parametrize(("pooling", "weighted"), [(0, False), (0, True), (1, False)])
def test_cpu_backward_plan_of_a_large_table_sorts_its_occurrences(seed, pooling, weighted):
    """A table with many more rows than the step's occurrences is planned by sorting the occurrences
    (csrc: kSortRowsPerOccurrence), not by counting over every row. Both orders are stable, so the
    bits are those of the counting plan: the same bags over a 50-row table and over that table with
    4950 more rows give the same sparse gradient and the same fused Adam update, bit for bit."""
    small = make_case(torch.float32, rows=(50, 37, 9), pooling=pooling, weighted=weighted)
    extra = torch.randn(4950, 7)
    large = dict(small, weights=[torch.cat([small["weights"][0], extra]), *small["weights"][1:]])
    per_feature = small["offsets"].diff().view(4, -1).sum(1)  # occurrences of each feature
    n0 = int(per_feature[torch.tensor(small["feature_table"]) == 0].sum())
    assert 5000 > 6 * n0 >= 50, "table 0: sorted when large, counted when small (kSortRowsPerOccurrence = 6)"
    grad_out = torch.randn(12, 7 + 33 + 7 + 1)
    for (r_s, g_s), (r_l, g_l) in zip(_C.embedding_backward_sparse(grad_out, *args(small)),
                                      _C.embedding_backward_sparse(grad_out, *args(large)), strict=True):
        assert torch.equal(r_s, r_l) and torch.equal(g_s.view(torch.int32), g_l.view(torch.int32))
    s1_s, s2_s = states_for("adam", small["weights"])
    s1_l = [torch.cat([s1_s[0], torch.zeros(4950, 7)]), *s1_s[1:]]
    s2_l = [torch.cat([s2_s[0], torch.zeros(4950, 7)]), *s2_s[1:]]
    cpu_fused(small, grad_out, "adam", s1_s, s2_s)
    cpu_fused(large, grad_out, "adam", s1_l, s2_l)
    assert torch.equal(large["weights"][0][50:], extra) and not s1_l[0][50:].any()
    for a, b in zip([*small["weights"], *s1_s, *s2_s], [*large["weights"], *s1_l, *s2_l], strict=True):
        assert torch.equal(a.view(torch.int32), b[: a.shape[0]].view(torch.int32))


def test_cpu_backward_plan_sorts_rows_past_two_radix_passes(seed):
    """Rows of 23 bits take three radix passes of the sort plan (csrc: kRadixBits = 11): the sparse
    gradient of a 2**22 + 3 row table (one column) is each distinct row once, increasing, with the sum
    of its occurrences' grad_out, rows at both ends and in the middle included."""
    rows = 2**22 + 3
    weight = torch.zeros(rows, 1)
    picks = torch.tensor([0, rows - 1, 2**11, 2**11 - 1, 2**22, 2**22 - 1, 2**21 + 5, 7])
    idx = picks[torch.randint(0, len(picks), (60,))]
    idx[:len(picks)] = picks  # every pick occurs
    off = torch.arange(0, 61, 5)  # 12 bags of 5
    grad_out = torch.randn(12, 1)
    (r, g), = _C.embedding_backward_sparse(grad_out, [weight], idx, off, [0], [-1], 0, None)
    expect = torch.zeros(rows, dtype=torch.float64).index_add_(
        0, idx, grad_out.double().repeat_interleave(5, 0).squeeze(1))
    assert torch.equal(r, idx.unique())
    torch.testing.assert_close(g.squeeze(1).double(), expect[idx.unique()], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_cpu_backward_bits_do_not_depend_on_threads(seed, dtype, mode):
    """Five runs with 1, 2, 3, 2 and 1 threads give the same bits: the public op's dense and sparse
    gradients (and the per_sample_weights gradient with sum) and the fused Adam's tables and states."""
    c = make_case(dtype, rows=(300, 40), dims=(33, 16), feature_table=(0, 1, 0), B=200, max_bag=30,
                  pooling=int(mode == "mean"), weighted=mode == "sum")
    grad_out = torch.randn(200, 33 + 16 + 33, dtype=torch.float64).to(dtype)
    w0 = [w.clone() for w in c["weights"]]
    pads = [None if p < 0 else p for p in c["padding_idx"]]
    results = []
    old = torch.get_num_threads()
    try:
        for nt in (1, 2, 3, 2, 1):
            torch.set_num_threads(nt)
            run = []
            for sparse in (False, True):
                ws = [w.clone().requires_grad_() for w in w0]
                psw = None if mode == "mean" else c["per_sample_weights"].to(dtype).requires_grad_()
                out = kfuse.multi_embedding_bag(ws, c["indices"], c["offsets"], c["feature_table"], mode, psw, pads,
                                                sparse=sparse, backend="cpu")
                out.backward(grad_out)
                run += [w.grad.to_dense() if sparse else w.grad for w in ws]
                run += [] if psw is None else [psw.grad]
            c["weights"] = [w.clone() for w in w0]
            s1, s2 = ([torch.zeros_like(s) for s in states] for states in states_for("adam", w0))
            cpu_fused(c, grad_out, "adam", s1, s2)
            results.append(run + c["weights"] + s1 + s2)
    finally:
        torch.set_num_threads(old)
    for r in results[1:]:
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(results[0], r, strict=True))


CPU_BAD = [
    ("indices out of range", lambda c: c["indices"].__setitem__(5, 50), IndexError,
     r"indices\[5\] = 50 is out of range \[0, 50\) for feature 0 \(table 0\)"),
    ("negative index", lambda c: c["indices"].__setitem__(-1, -3), IndexError, r"indices\[\d+\] = -3 is out of range"),
    ("offsets decreasing", lambda c: c["offsets"].__setitem__(4, 10**6), ValueError,
     r"offsets must be non-decreasing: offsets\[5\] = \d+ < offsets\[4\] = 1000000"),
    ("offsets not from 0", lambda c: c["offsets"].__setitem__(0, 1), ValueError, r"offsets\[0\] must be 0; got 1"),
    ("offsets not to N", lambda c: c.update(indices=c["indices"][:-1], per_sample_weights=None), ValueError,
     r"offsets\[48\] = \d+ must equal the number of indices"),
    ("offsets length", lambda c: c.__setitem__("offsets", c["offsets"][:-1]), ValueError,
     r"offsets must have F \* B \+ 1 entries"),
    ("psw length", lambda c: c.__setitem__("per_sample_weights", torch.ones(3)), ValueError,
     r"per_sample_weights must have one weight per index"),
    ("feature_table", lambda c: c["feature_table"].__setitem__(1, 3), IndexError, r"feature_table\[1\] = 3"),
    ("padding_idx", lambda c: c["padding_idx"].__setitem__(1, 37), ValueError, r"padding_idx\[1\] = 37"),
    ("psw with mean", lambda c: c.__setitem__("pooling", 1), ValueError, r"per_sample_weights are only supported"),
]


@pytest.mark.parametrize("what,spoil,exc,match", CPU_BAD, ids=[b[0] for b in CPU_BAD])
def test_cpu_bad_input_raises_and_writes_nothing(seed, what, spoil, exc, match):
    c = make_case(torch.float32, weighted=True, padding=False)
    c["indices"] = c["indices"].clone()
    spoil(c)
    before = [w.clone() for w in c["weights"]]
    grad_out = torch.ones(12, 48)
    s1, _ = states_for("rowwise_adagrad", c["weights"])
    s1_0 = [s.clone() for s in s1]
    with pytest.raises(exc, match=match):
        _C.embedding_forward(*args(c))
    with pytest.raises(exc, match=match):
        _C.embedding_backward_sparse(grad_out, *args(c))
    with pytest.raises(exc, match=match):
        cpu_fused(c, grad_out, "rowwise_adagrad", s1, [])
    assert all(torch.equal(a, b) for a, b in zip(c["weights"] + s1, before + s1_0, strict=True))


@pytest.mark.parametrize("features,n", [(1, 0), (1, 3), (2, 0)])
def test_cpu_empty_offsets_raise_in_every_entry_point(features, n):
    """Offsets of size 0 hold no F·B + 1 for any B >= 0; with one feature B = (0 - 1) / 1 = -1 once
    passed the size check and the kernels read offsets[0]. Every entry point raises before any read."""
    w = [torch.randn(4, 3)]
    idx, empty, go = torch.zeros(n, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3)
    ft, pads = [0] * features, [-1]
    calls = [lambda: _C.embedding_forward(w, idx, empty, ft, pads, 0, None),
             lambda: _C.embedding_backward_sparse(go, w, idx, empty, ft, pads, 0, None),
             lambda: _C.embedding_backward_psw(go, w, idx, empty, ft, pads),
             lambda: _C.embedding_backward_fused(go, w, idx, empty, ft, pads, 0, None, "sgd", [], [], 0.1, 0.0, 0.0,
                                                 0.0, 0.0, 1, 0)]
    for call in calls:
        with pytest.raises(ValueError, match=r"offsets must have F \* B \+ 1 entries \(B >= 0 bags\)"):
            call()


# ---------------------------------------------------------------- the Triton kernels, launcher by launcher
# Without a GPU under the Triton interpreter on CPU tensors with tiny shapes, in float32 and float16
# (the interpreter gets bfloat16 wrong); with a GPU compiled ('cuda' ids), with bfloat16 and a larger
# shape too.
TRITON_DEVICES = [pytest.param("cpu", marks=pytest.mark.interpret, id="interp"),
           pytest.param("cuda", marks=pytest.mark.cuda, id="cuda")]
# (device, tables dtype): bf16 only compiled (the interpreter gets bf16 wrong on CPU).
TRITON_DTYPES = [pytest.param("cpu", torch.float32, marks=pytest.mark.interpret, id="interp-float32"),
          pytest.param("cpu", torch.float16, marks=pytest.mark.interpret, id="interp-float16")]
TRITON_DTYPES += [pytest.param("cuda", dt, marks=pytest.mark.cuda, id=f"cuda-{str(dt)[6:]}")
           for dt in (torch.float32, torch.float16, torch.bfloat16)]
_HALF = (torch.float16, torch.bfloat16)

# Tables (rows, dim): odd dims 7, 1, 33 (33 crosses three 16-wide tiles under the interpreter);
# features 0 and 3 share table 0. The GPU adds a medical-sized case (dims 128 and 300).
TABLES, FT, PADS = [(40, 7), (25, 1), (60, 33)], [0, 1, 2, 0], [3, -1, 59]
GPU_TABLES, GPU_FT, GPU_PADS = [(2000, 128), (500, 300), (3000, 64)], [0, 1, 2, 0, 1], [0, -1, 2999]


def _inputs(device, dtype, seed, itype=torch.int64, batch=5, big=False):
    """(weights, indices, offsets, feature_table, padding_idx) on ``device``."""
    tables, ft, pads = (GPU_TABLES, GPU_FT, GPU_PADS) if big else (TABLES, FT, PADS)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(r, d, generator=gen).to(dtype).to(device) for r, d in tables]
    indices, offsets = make_bags(tables, ft, batch, gen, max_bag=30 if big else 7, itype=itype,
                                 padding=[None if p < 0 else p for p in pads])
    return weights, indices.to(device), offsets.to(device), ft, pads


def _sizes(device):
    return [False, True] if device == "cuda" else [False]


def _grad_out(weights, ft, batch, seed, device):
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(batch, sum(weights[t].shape[1] for t in ft), generator=gen).to(device)


def _psw(indices, seed):
    gen = torch.Generator().manual_seed(seed + 2)
    return torch.randn(indices.numel(), generator=gen).to(indices.device)


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("device,dtype", TRITON_DTYPES)
@pytest.mark.parametrize("mode,itype", [("sum", torch.int32), ("mean", torch.int64), ("weighted", torch.int32),
                                        ("sum", torch.int64)], ids=["sum-i32", "mean-i64", "weighted-i32", "sum-i64"])
def test_triton_forward_matches_reference(device, dtype, mode, itype, seed):
    for big in _sizes(device):
        ws, idx, off, ft, pads = _inputs(device, dtype, seed, itype, batch=64 if big else 5, big=big)
        psw = _psw(idx, seed) if mode == "weighted" else None
        pooling = 1 if mode == "mean" else 0
        out, flag = te.forward(ws, idx, off, ft, pads, pooling, psw)
        ref = multi_embedding_bag_reference([w.cpu() for w in ws], idx.cpu(), off.cpu(), ft, pooling,
                                            None if psw is None else psw.cpu(), pads)
        assert out.dtype == dtype and out.shape == ref.shape
        assert_close(out, ref, dtype, f"forward big={big}")
        assert flag.tolist() == [te.NO_ERROR, te.NO_ERROR]
        te.check_flag(flag, idx, off)


@pytest.mark.parametrize("backend,device", backends())
def test_a_table_no_feature_reads_gets_no_gradient(backend, device):
    """Several features may share a table, so a table may be read by none: autograd (and the per-table loop)
    gives it no gradient. The kernels gave dense zeros (sparse: an empty tensor), which AdamW's decay then
    applied to a table the model never used (edge-semantics hunt, 2026-12-07). Eager, registered op and
    double backward alike."""
    idx, off = torch.tensor([1, 2, 3, 4, 0, 1], device=device), torch.tensor([0, 1, 3, 4, 6], device=device)
    for path in ("eager-dense", "eager-sparse", "registered", "create_graph"):
        ws = [torch.randn(5, 3, device=device, requires_grad=True), torch.randn(4, 2, device=device,
                                                                                requires_grad=True)]
        if path == "registered":
            y = torch.ops.kfuse.embedding_bag_forward(ws, idx, off, [0, 0], [-1, -1], 0, None, backend)
        else:
            y = kfuse.multi_embedding_bag(ws, idx, off, feature_table=[0, 0], sparse=path == "eager-sparse",
                                          backend=backend)
        if path == "create_graph":
            grads = torch.autograd.grad(y.sum(), ws, create_graph=True, allow_unused=True)
        else:
            y.sum().backward()
            grads = [w.grad for w in ws]
        assert grads[1] is None, path
        assert grads[0] is not None and grads[0].to_dense().abs().sum() > 0, path
    m = MultiTableEmbeddingBag([(5, 3), (4, 2)], feature_table_map=[0, 0], backend=backend).to(device)
    before = m.weights[1].detach().clone()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.5)
    m(idx, off).sum().backward()
    opt.step()
    assert torch.equal(m.weights[1].detach(), before)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_rows_too_wide_for_a_block_are_refused_naming_the_tables(device):
    """The backward holds a table row in one Triton block, which Triton caps at 2^20 elements, and the forward
    grid's third axis (a row's blocks) is capped at 65535: past them the compiler's or the launch's error named
    nothing (overflow hunt, 2026-12-07). Refused before any launch, naming the argument."""
    wide = [torch.zeros(2, 2**20 + 1, dtype=torch.float16, device=device)]
    idx, off = torch.tensor([1], device=device), torch.tensor([0, 1], device=device)
    go = torch.zeros(1, 2**20 + 1, device=device)
    with pytest.raises(ValueError, match=r"weights has rows of 1048577 elements; the backward holds a row in one"):
        te.backward_sparse(go, wide, idx, off, [0], [-1], 0, None)
    with pytest.raises(ValueError, match=r"weights has rows of 1048577 elements"):
        te.backward_fused(go, wide, idx, off, [0], [-1], 0, None, "sgd", [], [], 0.1, 0.0, 0.0, 0.0, 0.0, 1, 0)
    with pytest.raises(ValueError, match=r"y has rows of 1048577 elements"):
        te.stochastic_round(go, torch.tensor([1], device=device), torch.float16, 0, 1, 0)
    dim = 65535 * te._block_d(2**24) + 1  # one column past the forward's grid
    with pytest.raises(ValueError, match=rf"weights has rows of {dim} elements; the forward takes at most {dim - 1}"):
        te.forward([torch.zeros(1, dim, dtype=torch.float16, device=device)], idx.clamp(max=0), off, [0], [-1], 0,
                   None)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_empty_bags_and_batches(device):
    ws = [torch.randn(4, 3, device=device), torch.randn(5, 18, device=device)]
    idx = torch.zeros(0, dtype=torch.int64, device=device)
    off = torch.zeros(7, dtype=torch.int64, device=device)  # 2 features x 3 empty bags
    for pooling in (0, 1):
        out, flag = te.forward(ws, idx, off, [0, 1], [-1, -1], pooling, None)
        assert torch.equal(out, torch.zeros(3, 21, device=device))
        assert flag.tolist() == [te.NO_ERROR, te.NO_ERROR]
    go = torch.randn(3, 21, device=device)
    assert [(r.numel(), tuple(g.shape)) for r, g in te.backward_sparse(go, ws, idx, off, [0, 1], [-1, -1], 0, None)] \
        == [(0, (0, 3)), (0, (0, 18))]
    assert te.backward_psw(go, ws, idx, off, [0, 1], [-1, -1]).shape == (0,)
    te.backward_fused(go, ws, idx, off, [0, 1], [-1, -1], 0, None, "sgd", [], [], 0.1, 0.0, 0.0, 0.0, 0.0, 1, 0)
    out, _ = te.forward(ws, idx, off[:1], [0, 1], [-1, -1], 0, None)  # B = 0
    assert out.shape == (0, 21)
    # Bags of padding only: zeros (mean included), no gradient rows, nothing updated.
    idx = torch.tensor([1, 1, 4, 4], device=device)
    off = torch.tensor([0, 1, 2, 2, 3, 4, 4], device=device)
    for pooling in (0, 1):
        out, flag = te.forward(ws, idx, off, [0, 1], [1, 4], pooling, None)
        assert torch.equal(out, torch.zeros(3, 21, device=device)) and flag.tolist()[0] == te.NO_ERROR
    assert all(r.numel() == 0 for r, _ in te.backward_sparse(go, ws, idx, off, [0, 1], [1, 4], 1, None))
    before = [w.clone() for w in ws]
    te.backward_fused(go, ws, idx, off, [0, 1], [1, 4], 0, None, "sgd", [], [], 0.1, 0.0, 0.0, 0.0, 0.0, 1, 0)
    assert all(torch.equal(w, b) for w, b in zip(ws, before, strict=True))


# ---------------------------------------------------------------- backward
def _reference_sparse(go, ws, idx, off, ft, pads, pooling, psw):
    """Per table (rows, grads float64) from the reference's dense backward."""
    dense, _ = multi_embedding_bag_backward_reference(go.cpu(), [w.cpu() for w in ws], idx.cpu(), off.cpu(), ft,
                                                      pooling, None if psw is None else psw.cpu(), pads)
    return [sparse_grad(g, idx.cpu(), off.cpu(), ft, t, pads[t]) for t, g in enumerate(dense)]


@pytest.mark.parametrize("device,dtype", TRITON_DTYPES)
@pytest.mark.parametrize("mode,itype", [("sum", torch.int64), ("mean", torch.int32), ("weighted", torch.int64)],
                         ids=["sum-i64", "mean-i32", "weighted-i32"])
def test_triton_backward_sparse_matches_reference_and_repeats_bitwise(device, dtype, mode, itype, seed):
    for big in _sizes(device):
        batch = 64 if big else 5
        ws, idx, off, ft, pads = _inputs(device, dtype, seed, itype, batch=batch, big=big)
        psw = _psw(idx, seed) if mode == "weighted" else None
        pooling = 1 if mode == "mean" else 0
        go = _grad_out(ws, ft, batch, seed, device)
        parts = te.backward_sparse(go, ws, idx, off, ft, pads, pooling, psw)
        for t, ((rows, g), (ref_rows, ref_g)) in enumerate(zip(
                parts, _reference_sparse(go, ws, idx, off, ft, pads, pooling, psw), strict=True)):
            assert rows.dtype == torch.int64 and g.dtype == torch.float32
            assert torch.equal(rows.cpu(), ref_rows), f"rows of table {t}"
            assert_close(g, ref_g, torch.float32, f"grads of table {t}")
        again = te.backward_sparse(go, ws, idx, off, ft, pads, pooling, psw)
        for (r1, g1), (r2, g2) in zip(parts, again, strict=True):
            assert torch.equal(r1, r2) and torch.equal(g1.view(torch.int32), g2.view(torch.int32))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_backward_long_runs_cross_blocks(device, seed):
    """A row's occurrences are summed in blocks (te._block_r: 4 under the interpreter, 8-32 on a GPU):
    runs of one, of exactly one and two blocks (the last block full, so an empty one follows) and of
    several, across features of one table, weighted, against the reference; bitwise repeatable."""
    gen = torch.Generator().manual_seed(seed)
    block = te._block_r(128)
    ws = [torch.randn(6, 128, generator=gen).to(device), torch.randn(3, 5, generator=gen).to(device)]
    runs = {0: 1, 1: block, 2: 2 * block, 3: 3 * block + 1, 4: 7 * block + 3}  # row: occurrences in table 0
    idx0 = torch.tensor([r for r, n in runs.items() for _ in range(n)])
    idx0 = idx0[torch.randperm(idx0.numel(), generator=gen)]  # spread over bags and both features
    B, half = 4, idx0.numel() // 2
    cuts = lambda n, lo: [lo + n * i // B for i in range(B)]  # noqa: E731
    idx1 = torch.tensor([0, 2, 2, 1, 2, 2, 2])
    idx = torch.cat([idx0, idx1]).to(device)
    off = torch.tensor(cuts(half, 0) + cuts(idx0.numel() - half, half) + cuts(7, idx0.numel()) + [idx.numel()])
    off, ft, pads = off.to(device), [0, 0, 1], [-1, -1]
    psw = torch.rand(idx.numel(), generator=gen).to(device)
    go = torch.randn(B, 128 * 2 + 5, generator=gen).to(device)
    parts = te.backward_sparse(go, ws, idx, off, ft, pads, 0, psw)
    for t, ((rows, g), (ref_rows, ref_g)) in enumerate(zip(
            parts, _reference_sparse(go, ws, idx, off, ft, pads, 0, psw), strict=True)):
        assert torch.equal(rows.cpu(), ref_rows), f"rows of table {t}"
        assert_close(g, ref_g, torch.float32, f"grads of table {t}")
    again = te.backward_sparse(go, ws, idx, off, ft, pads, 0, psw)
    assert all(torch.equal(g1.view(torch.int32), g2.view(torch.int32))
               for (_, g1), (_, g2) in zip(parts, again, strict=True))


@pytest.mark.interpret
@pytest.mark.parametrize("mode", ["sum", "mean", "weighted"])
def test_triton_gpu_tiles_under_interpreter(mode, monkeypatch, seed):
    """The launchers with the tiles a GPU runs (dim tiles of 128, occurrence blocks of 32; the other
    interpreter tests use 16 and 4), at dims below, at and across a tile (7, 128, 300) and with a row
    that occurs more than 2 blocks' worth, in fp16: forward, sparse and per-sample-weight backward, and
    a fused row-wise Adagrad step, against the reference."""
    monkeypatch.setattr(te, "INTERPRETED", False)
    assert (te._block_d(300), te._block_r(128)) == (128, 32)
    gen = torch.Generator().manual_seed(seed)
    tables, ft, pads = [(50, 128), (9, 300), (30, 7)], [0, 1, 2, 0], [-1, 4, 29]
    ws = [torch.randn(r, d, generator=gen).half() for r, d in tables]
    idx, off = make_bags(tables, ft, 6, gen, max_bag=9, padding=[None, 4, 29])
    hot = torch.full((70,), 3)  # row 3 of table 0: ~80 occurrences in its last bag
    idx = torch.cat([idx, hot])
    off = torch.cat([off[:-1], off[-1:] + hot.numel()])
    psw = _psw(idx, seed) if mode == "weighted" else None
    pooling = 1 if mode == "mean" else 0
    out, flag = te.forward(ws, idx, off, ft, pads, pooling, psw)
    ref = multi_embedding_bag_reference(ws, idx, off, ft, pooling, psw, pads)
    assert_close(out, ref, torch.float16, "forward")
    te.check_flag(flag, idx, off)
    go = _grad_out(ws, ft, 6, seed, "cpu")
    parts = te.backward_sparse(go, ws, idx, off, ft, pads, pooling, psw)
    for t, ((rows, g), (ref_rows, ref_g)) in enumerate(zip(
            parts, _reference_sparse(go, ws, idx, off, ft, pads, pooling, psw), strict=True)):
        assert torch.equal(rows, ref_rows), f"rows of table {t}"
        assert_close(g, ref_g, torch.float32, f"grads of table {t}")
    if psw is not None:
        _, ref_psw = multi_embedding_bag_backward_reference(go, ws, idx, off, ft, 0, psw, pads)
        assert_close(te.backward_psw(go, ws, idx, off, ft, pads), ref_psw, torch.float32, "psw grad")
    s1, s2 = _states("rowwise_adagrad", ws, seed)
    exp_w, exp_s1, _ = _expected_update("rowwise_adagrad", ws, s1, s2, parts, 3, 11)
    te.backward_fused(go, ws, idx, off, ft, pads, pooling, psw, "rowwise_adagrad", s1, s2, step=3, seed=11, **_HP)
    for t in range(len(ws)):
        assert _ulps(ws[t], exp_w[t]) <= 1, f"table {t}"
        assert_close(s1[t], exp_s1[t], torch.float32, f"state of table {t}")


@pytest.mark.parametrize("device,dtype", TRITON_DTYPES)
def test_triton_backward_psw_matches_reference(device, dtype, seed):
    for big in _sizes(device):
        batch = 64 if big else 5
        ws, idx, off, ft, pads = _inputs(device, dtype, seed, torch.int32, batch=batch, big=big)
        go = _grad_out(ws, ft, batch, seed, device)
        psw = _psw(idx, seed)
        got = te.backward_psw(go, ws, idx, off, ft, pads)
        _, ref = multi_embedding_bag_backward_reference(go.cpu(), [w.cpu() for w in ws], idx.cpu(), off.cpu(), ft, 0,
                                                        psw.cpu(), pads)
        assert got.dtype == torch.float32
        assert_close(got, ref, torch.float32, "grad of per_sample_weights")


@pytest.mark.parametrize("backend,device", backends())
def test_psw_gradient_at_padding_is_zero_whatever_grad_out_holds(backend, device):
    """A padding position's per_sample_weights gradient is 0, as torch's: the Triton kernel multiplied its
    masked row (0) by an inf or NaN of grad_out and stored NaN (numerical hunt)."""
    w = torch.randn(8, 4, requires_grad=True)
    idx, off = torch.tensor([1, 5, 2]), torch.tensor([0, 2])
    for bad in (float("inf"), float("nan")):
        psw = torch.rand(3, requires_grad=True)
        go = torch.ones(2, 4)
        go[0, 1] = bad
        out = kfuse.embedding_bag(idx.to(device), w.to(device), off.to(device), mode="sum",
                                  per_sample_weights=psw.to(device), padding_idx=5, backend=backend)
        out.backward(go.to(device))
        want = torch.rand(3, requires_grad=True)
        with torch.no_grad():
            want.copy_(psw)
        F.embedding_bag(idx, w, off, mode="sum", per_sample_weights=want, padding_idx=5).backward(go)
        assert psw.grad[1] == 0 and want.grad[1] == 0
        assert torch.equal(psw.grad.isnan(), want.grad.isnan())


# ---------------------------------------------------------------- fused optimizers
_HP = dict(lr=0.05, eps=1e-6, beta1=0.9, beta2=0.99, weight_decay=0.01)


def _states(opt, ws, seed):
    gen = torch.Generator().manual_seed(seed + 3)
    dev = ws[0].device
    if opt == "sgd":
        return [], []
    if opt == "rowwise_adagrad":
        return [torch.rand(w.shape[0], generator=gen).to(dev) for w in ws], []
    return ([torch.randn(w.shape, generator=gen).to(dev) for w in ws],
            [torch.rand(w.shape, generator=gen).to(dev) for w in ws])


def _expected_update(opt, ws, s1, s2, parts, step, seed):
    """The reference's per-row rules applied to the row-sparse gradients ``parts`` (float32), with
    stochastic rounding for half tables: new (tables, states1, states2)."""
    ws, s1, s2 = [w.clone() for w in ws], [s.clone() for s in s1], [s.clone() for s in s2]
    h = _HP
    for t, (rows, g) in enumerate(parts):
        g = g.to(ws[t].device).float()
        cur = ws[t][rows].float()
        if opt == "sgd":
            new = sgd_update(cur, g, h["lr"], h["weight_decay"])
        elif opt == "rowwise_adagrad":
            st = s1[t][rows]
            new = rowwise_adagrad_update(cur, g, st, h["lr"], h["eps"], h["weight_decay"])
            s1[t][rows] = st
        else:
            m, v = s1[t][rows], s2[t][rows]
            new = adam_update(cur, g, m, v, h["lr"], h["beta1"], h["beta2"], h["eps"], step, h["weight_decay"])
            s1[t][rows], s2[t][rows] = m, v
        if ws[t].dtype in _HALF:
            u = rounding_bits(seed, step, t, rows.unsqueeze(1).cpu(), torch.arange(g.shape[1]).unsqueeze(0))
            ws[t][rows] = stochastic_round(new.cpu(), ws[t].dtype, u).to(ws[t].device)
        else:
            ws[t][rows] = new
    return ws, s1, s2


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in units in the last place between same-dtype tensors (same sign)."""
    bits = torch.int16 if a.element_size() == 2 else torch.int32
    return int((a.view(bits).long() - b.view(bits).long()).abs().max()) if a.numel() else 0


@pytest.mark.parametrize("device,dtype", TRITON_DTYPES)
@pytest.mark.parametrize("opt", ["sgd", "rowwise_adagrad", "adam"])
def test_triton_fused_optimizer_matches_reference_rules(device, dtype, opt, seed):
    """Against the reference rules applied to backward_sparse's gradient (checked above): SGD bit-exact
    under the interpreter (no fused multiply-adds); otherwise within an ulp of half tables (FMA
    contraction, a reduction order or a square root may move the float32 value, and with it a
    stochastic choice) or the fp32 tolerance. The fused update repeats bitwise from the same start."""
    step, rng_seed = 3, 2**33 + 17
    ws, idx, off, ft, pads = _inputs(device, dtype, seed, torch.int32)
    go = _grad_out(ws, ft, 5, seed, device)
    s1, s2 = _states(opt, ws, seed)
    parts = te.backward_sparse(go, ws, idx, off, ft, pads, 0, None)
    exp_w, exp_s1, exp_s2 = _expected_update(opt, ws, s1, s2, parts, step, rng_seed)
    runs = []
    for _ in range(2):
        w_run, s1_run, s2_run = [w.clone() for w in ws], [s.clone() for s in s1], [s.clone() for s in s2]
        te.backward_fused(go, w_run, idx, off, ft, pads, 0, None, opt, s1_run, s2_run, step=step, seed=rng_seed,
                          **_HP)
        runs.append((w_run, s1_run, s2_run))
    (w1, a1, b1), (w2, a2, b2) = runs
    for x, y in zip(w1 + a1 + b1, w2 + a2 + b2, strict=True):
        assert _ulps(x, y) == 0, "the fused update is not bitwise repeatable"
    # Bit-exact only for SGD: row-wise Adagrad's mean square is a reduction whose order torch's mean
    # does not share, and torch's CPU float32 sqrt is not correctly rounded (1 ulp off for ~18 % of
    # inputs on this machine) while the kernels' sqrt_rn is.
    exact = device == "cpu" and opt == "sgd"
    for t, (got, exp) in enumerate(zip(w1, exp_w, strict=True)):
        if exact or dtype in _HALF:
            assert _ulps(got, exp) <= (0 if exact else 1), f"table {t}: {_ulps(got, exp)} ulps"
        else:
            assert_close(got, exp, dtype, f"table {t}")
        untouched = torch.ones(got.shape[0], dtype=torch.bool, device=device)
        untouched[parts[t][0]] = False
        assert torch.equal(got[untouched], ws[t][untouched]), f"table {t}: rows without gradient changed"
    for got, exp in zip(a1 + b1, exp_s1 + exp_s2, strict=True):
        if exact:
            assert torch.equal(got, exp)
        else:
            assert_close(got, exp, torch.float32, "optimizer state")


@pytest.mark.parametrize("device,dtype", [p for p in TRITON_DTYPES if p.values[1] in _HALF])
def test_triton_stochastic_rounding_bits_match_reference(device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(6, 37, generator=gen) * torch.logspace(-9, 6, 37)  # subnormal to large
    ymax = torch.finfo(dtype).max
    y[0, :8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), ymax * 1.001, -ymax, 1.0])
    y[1] = y[1].to(dtype).float()  # exactly representable values stay put
    rows = torch.tensor([0, 7, 2**32 + 5, 2**40 - 1, 123456789, 3])
    for s, step, table in ((seed, 1, 0), (2**35 + seed, 2**32 + 9, 7)):
        got = te.stochastic_round(y.to(device), rows.to(device), dtype, s, step, table).cpu()
        ref = stochastic_round(y, dtype, rounding_bits(s, step, table, rows.unsqueeze(1),
                                                       torch.arange(37).unsqueeze(0)))
        # Bit for bit but for the NaN's payload: a GPU's conversion gives the canonical 0x7fff, the
        # CPU's 0x7e00 (fp16) or 0xffff (bf16, ATen's vectorised conversion).
        nan = torch.isnan(ref)
        assert nan.any() and torch.equal(torch.isnan(got), nan)
        assert torch.equal(got.view(torch.int16)[~nan], ref.view(torch.int16)[~nan])


# ---------------------------------------------------------------- bad input: flagged, never dereferenced
def _guarded(shapes, device, dtype=torch.float32, guard_rows=2):
    """Tables as contiguous views into one NaN-filled buffer with ``guard_rows`` rows of NaN on each
    side: a read of row −2, −1, rows or rows + 1 poisons the result, a write changes the guard."""
    total = sum((r + 2 * guard_rows) * d for r, d in shapes)
    buf = torch.full((total,), float("nan"), dtype=dtype, device=device)
    ws, at = [], 0
    for r, d in shapes:
        lo = at + guard_rows * d
        w = buf[lo: lo + r * d].view(r, d)
        w.copy_(torch.randn(r, d))
        ws.append(w)
        at += (r + 2 * guard_rows) * d
    return buf, ws


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_feature_meta_cache_keys_on_everything_a_row_holds(device, seed, monkeypatch):
    """The forward's per-feature metadata is cached (a training loop's calls make no host-to-device
    copy): the same tables with another padding_idx or feature order, and another view of one table's
    memory (same address, other shape), must each get their own rows; the cache stays bounded."""
    monkeypatch.setattr(te, "_META_CACHE", {})  # empty, whatever earlier tests left (a full one caches nothing)
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(48, 6, generator=gen).to(device)
    other = torch.randn(30, 6, generator=gen).to(device)
    cases = [([base, other], [0, 1], [-1, -1]), ([base, other], [0, 1], [3, -1]), ([base, other], [1, 0], [-1, -1]),
             ([base, other], [1, 0, 1], [-1, 7]), ([base.view(72, 4), other.view(45, 4)], [0, 1], [-1, -1])]
    for ws, ft, pads in cases:
        shapes = [tuple(w.shape) for w in ws]
        idx, off = make_bags(shapes, ft, 5, gen, padding=[None if p < 0 else p for p in pads])
        for _ in range(2):  # the second call hits the cache
            out, flag = te.forward(ws, idx.to(device), off.to(device), ft, pads, 0, None)
            ref = multi_embedding_bag_reference([w.cpu() for w in ws], idx, off, ft, 0, None, pads)
            assert_close(out.cpu(), ref, torch.float32, f"ft {ft}, pads {pads}, shapes {shapes}")
    # Full, it keeps what it holds (a captured graph or another stream may still read those tensors) and
    # builds the rest per call.
    held = dict(te._META_CACHE)
    w = torch.randn(80, 3, generator=gen).to(device)
    idx, off = torch.tensor([5, 1], device=device), torch.tensor([0, 1, 2], device=device)
    for pad in range(te._META_CACHE_SIZE + 5):
        out, _ = te.forward([w], idx, off, [0, 0], [pad], 0, None)
        ref = multi_embedding_bag_reference([w.cpu()], idx.cpu(), off.cpu(), [0, 0], 0, None, [pad])
        assert_close(out.cpu(), ref, torch.float32, f"padding_idx {pad}")
    assert len(te._META_CACHE) <= te._META_CACHE_SIZE
    assert all(te._META_CACHE.get(k, (None,))[0] is v[0] for k, v in held.items()), "an entry was dropped"


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_out_of_range_indices_set_the_flag_and_read_nothing(device, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(9, 5), (6, 17)]
    ft, pads = [0, 1, 0], [2, 0]
    buf, ws = _guarded(shapes, device)
    idx, off = make_bags(shapes, ft, 4, gen, empty=0.0)
    # Every bag holds >= 1 index, so each feature spans >= 4 positions: these are distinct, in
    # features 0, 1, 2 and 2 (tables 0, 1, 0, 0), and each lands in a guard when read.
    bad_pos = [2, int(off[4]) + 1, int(off[8]), int(off[-1]) - 1]
    good = idx.clone()
    for p, t, delta in zip(bad_pos, [0, 1, 0, 0], [-1, 0, -2, 1], strict=True):
        idx[p] = shapes[t][0] + delta if delta >= 0 else delta
        good[p] = pads[t]  # the reference skips it like padding
    idx, off, good = idx.to(device), off.to(device), good.to(device)
    guard_bits = buf.view(torch.int32).clone()
    for pooling in (0, 1):
        out, flag = te.forward(ws, idx, off, ft, pads, pooling, None)
        assert flag.tolist() == [min(bad_pos), te.NO_ERROR]
        ref = multi_embedding_bag_reference([w.cpu() for w in ws], good.cpu(), off.cpu(), ft, pooling, None, pads)
        assert_close(out, ref, torch.float32, "forward with bad indices skipped")
        with pytest.raises(IndexError, match=rf"indices\[{min(bad_pos)}\] = -?\d+ is out of range"):
            te.check_flag(flag, idx, off)
    go = _grad_out(ws, ft, 4, seed, device)
    psw = _psw(idx, seed)
    for (r1, g1), (r2, g2) in zip(te.backward_sparse(go, ws, idx, off, ft, pads, 0, psw),
                                  te.backward_sparse(go, ws, good, off, ft, pads, 0, psw), strict=True):
        assert torch.equal(r1, r2) and torch.equal(g1, g2)
    g_psw = te.backward_psw(go, ws, idx, off, ft, pads)
    assert torch.isfinite(g_psw).all() and (g_psw[bad_pos] == 0).all()
    s1 = [torch.zeros(r, device=device) for r, _ in shapes]
    te.backward_fused(go, ws, idx, off, ft, pads, 0, None, "rowwise_adagrad", s1, [], step=1, seed=0, **_HP)
    assert all(torch.isfinite(w).all() for w in ws)
    tables = torch.zeros_like(buf, dtype=torch.bool)
    for w in ws:
        start = (w.data_ptr() - buf.data_ptr()) // buf.element_size()
        tables[start: start + w.numel()] = True
    assert torch.equal(buf.view(torch.int32)[~tables], guard_bits[~tables]), "a guard was written"


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("case", ["decreasing", "past_end", "first_not_zero", "last_short", "negative"])
def test_triton_bad_offsets_are_clamped_and_flagged(device, case, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes, ft = [(9, 5), (6, 3)], [0, 1]
    ws = [torch.randn(r, d, generator=gen).to(device) for r, d in shapes]
    idx, off = make_bags(shapes, ft, 3, gen, empty=0.0)
    n = idx.numel()
    pos, val = {"decreasing": (3, int(off[2]) - 1), "past_end": (4, n + 5), "first_not_zero": (0, 1),
                "last_short": (6, n - 1), "negative": (2, -3)}[case]
    off[pos] = val
    out, flag = te.forward(ws, idx.to(device), off.to(device), ft, [-1, -1], 0, None)
    assert flag.tolist()[1] == pos and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=rf"offsets\[{pos}\] = {val}"):
        te.check_flag(flag, idx, off)
    # The backward kernels clamp the same way (nothing to compare with: the input is invalid).
    go = torch.randn(out.shape, device=device)
    te.backward_sparse(go, ws, idx.to(device), off.to(device), ft, [-1, -1], 1, None)
    assert torch.isfinite(te.backward_psw(go, ws, idx.to(device), off.to(device), ft, [-1, -1])).all()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_checks_the_offset_of_no_bags(device):
    """B = 0 launches no program, yet the one offset is checked as the kernel would (flagged on the
    device): it must be 0 and len(indices); the op then raises as the cpu and reference backends do."""
    ws = [torch.randn(5, 4, device=device)]
    idx, t = torch.arange(3, device=device), functools.partial(torch.tensor, device=device)
    for n, off in ((3, 2), (3, 0), (0, 3)):
        out, flag = te.forward(ws, idx[:n], t([off]), [0], [-1], 0, None)
        assert out.shape == (0, 4) and flag.tolist() == [te.NO_ERROR, 0]
        with pytest.raises(ValueError, match=rf"offsets\[0\] = {off}"):
            te.check_flag(flag, idx[:n], t([off]))
    out, flag = te.forward(ws, idx[:0], t([0]), [0], [-1], 0, None)
    assert out.shape == (0, 4) and flag.tolist() == [te.NO_ERROR, te.NO_ERROR]
    for backend in ["triton", "reference"] + (["cpu"] if device == "cpu" else []):
        with pytest.raises(ValueError, match=r"offsets(\[0\])? must (start at|be) 0"):
            kfuse.multi_embedding_bag(ws, idx, t([2]), backend=backend)


def test_triton_launchers_refuse_indices_whose_positions_would_wrap():
    """Positions are int32 in the kernels, and the backward's segment kernel reads a block of up to 32
    positions past a run's end: within 32 of 2^31 indices that position wrapped negative (an out-of-bounds
    read; overflow audit). The launchers take up to 2^31 - 65 indices and refuse more, saying so. (Meta
    tensors: the checks read shapes only.)"""
    ws = [torch.empty(10, 4, device="meta")]

    def check(n: int) -> int:
        idx, off = torch.empty(n, dtype=torch.int64, device="meta"), torch.empty(3, dtype=torch.int64, device="meta")
        return te._check(ws, idx, off, [0], [-1], None)

    assert check(2**31 - 65) == 2
    for n in (2**31 - 64, 2**31 - 2):
        with pytest.raises(ValueError, match=f"at most {2**31 - 65} indices and 2\\^31 - 2 bags; got {n} indices"):
            check(n)


@pytest.fixture
def no_pending_checks():
    """No check="async" error left over from another test, before or after this one."""
    E._DEFERRED.clear()
    yield
    E._DEFERRED.clear()


def test_async_check_waits_for_a_flag_another_thread_is_looking_at(no_pending_checks):
    """check_embedding_errors() (waiting) returned cleanly after this thread's bad check="async" call when
    another thread's call polled the flags meanwhile: the poll took every pending record off the list while
    it asked each whether its flag had arrived (concurrency hunt, 2026-12-05). The flag here is on its way,
    as a GPU's is until its event completes; the other thread asks about it exactly when this one checks."""
    import threading  # noqa: PLC0415

    asked, checked = threading.Event(), threading.Event()

    class OnItsWay:  # a torch.cuda.Event stand-in: its copy completes when waited for
        done = False

        def query(self) -> bool:
            if threading.current_thread() is not threading.main_thread():
                asked.set()
                checked.wait(0.5)  # the main thread checks while this poll looks at the flag
            return self.done

        def synchronize(self) -> None:
            self.done = True

    w = torch.randn(10, 4)
    idx, off = torch.tensor([1, 12]), torch.tensor([0, 2])
    bags = E._validate("multi_embedding_bag", [w], idx, off, None, "sum", None, None, "async")
    flag = torch.tensor([1, te.NO_ERROR], dtype=torch.int32)  # what the kernel records: indices[1] is bad
    E._DEFERRED.append(E._Deferred(flag, OnItsWay(), [10], idx, off, bags))
    poll = threading.Thread(target=E.poll_errors)
    poll.start()
    assert asked.wait(5)
    try:
        with pytest.raises(IndexError, match=r"indices\[1\] = 12 is out of range \[0, 10\)"):
            kfuse.check_embedding_errors()
    finally:
        checked.set()
        poll.join()
    assert not E._DEFERRED


def test_async_check_queries_no_event_during_graph_capture(monkeypatch, no_pending_checks):
    """Every call of the ops polls pending check="async" flags first; during a CUDA-graph capture the poll
    queried the warm-up call's event, which invalidates the capture (GPU review, 2026-12-05). During a
    capture the poll leaves flags on their way, and a waiting check refuses by name; after it, the flag is
    checked. (A capture and an event stand-in: this runs on the CPU.)"""
    class NotDuringCapture:
        def query(self) -> bool:
            assert not capturing[0], "an event was queried during capture"
            return True

        def synchronize(self) -> None:
            assert not capturing[0], "an event was waited for during capture"

    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    w = torch.randn(10, 4)
    idx, off = torch.tensor([1, 12]), torch.tensor([0, 2])
    bags = E._validate("multi_embedding_bag", [w], idx, off, None, "sum", None, None, "async")
    flag = torch.tensor([1, te.NO_ERROR], dtype=torch.int32)  # indices[1] is bad
    E._DEFERRED.append(E._Deferred(flag, NotDuringCapture(), [10], idx, off, bags))
    E.poll_errors()
    with pytest.raises(RuntimeError, match="during CUDA-graph capture"):
        kfuse.check_embedding_errors()
    assert len(E._DEFERRED) == 1
    capturing[0] = False
    with pytest.raises(IndexError, match=r"indices\[1\] = 12 is out of range \[0, 10\)"):
        E.poll_errors()
    assert not E._DEFERRED


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_async_pending_check_holds_no_table(device, no_pending_checks):
    """A pending check="async" call kept its tables alive (for the row counts its error names), so a deleted
    module's tables stayed allocated until the next call (leak hunt). It keeps their row counts: the
    tables go with the module, and a bad index is still named with its table's range."""
    import gc  # noqa: PLC0415
    import weakref  # noqa: PLC0415

    m = MultiTableEmbeddingBag([(1000, 16)], backend="triton", check="async", device=device)
    t = functools.partial(torch.tensor, device=device)
    m(t([1, 2, 3]), t([0, 1, 3]))
    table = weakref.ref(m.weights[0])
    assert E._DEFERRED
    del m
    gc.collect()
    assert table() is None
    w = torch.zeros(10, 4, device=device)
    kfuse.multi_embedding_bag([w], t([1, 12]), t([0, 2]), backend="triton", check="async")
    with pytest.raises(IndexError, match=r"indices\[1\] = 12 is out of range \[0, 10\)"):
        kfuse.check_embedding_errors()


@pytest.mark.cuda
def test_cached_metadata_is_on_the_device_for_another_stream(no_pending_checks):
    """The launcher's cached per-feature metadata was copied non-blocking on the first call's stream: a later
    call on another stream hit the cache and could read it before it arrived (review 2026-12-05). Stream A is
    kept busy, so its copy comes late; check="async" so that the first call makes no sync of its own."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(1237, 24), (611, 40)]  # shapes no other test uses: a cache miss here
    ws = [torch.randn(r, d, generator=gen).cuda() for r, d in shapes]
    idx, off = make_bags(shapes, [0, 1], 8, gen, empty=0.0)
    idx, off = idx.cuda(), off.cuda()
    want = kfuse.multi_embedding_bag([w.cpu() for w in ws], idx.cpu(), off.cpu(), backend="cpu")
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    a.wait_stream(torch.cuda.current_stream())
    b.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(a):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of A's time before its copy
        out_a = kfuse.multi_embedding_bag(ws, idx, off, backend="triton", check="async")
    with torch.cuda.stream(b):
        out_b = kfuse.multi_embedding_bag(ws, idx, off, backend="triton", check="async")
    torch.cuda.synchronize()
    kfuse.check_embedding_errors()
    assert torch.equal(out_b, out_a)
    assert_close(out_b.cpu(), want, torch.float32, "forward")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_async_check_raises_at_a_later_call(device, seed, no_pending_checks):
    """check="async": the bad call returns (bad indices skipped, nothing out of range read), the next call of
    either op raises naming the bad call's argument, once; valid calls give the sync mode's bits."""
    gen = torch.Generator().manual_seed(seed)
    shapes, ft = [(9, 5), (6, 17)], [0, 1, 0]
    ws = [torch.randn(r, d, generator=gen).to(device) for r, d in shapes]
    idx, off = make_bags(shapes, ft, 4, gen, empty=0.0)
    idx, off = idx.to(device), off.to(device)
    call = functools.partial(kfuse.multi_embedding_bag, ws, feature_table=ft, backend="triton")
    assert torch.equal(call(idx, off, check="async"), call(idx, off))
    bad = idx.clone()
    bad[3] = 9  # feature 0 reads table 0 (9 rows)
    good = idx.clone()
    good[3] = 0
    out = call(bad, off, check="async")
    skip = torch.ones(idx.numel(), dtype=torch.float64)
    skip[3] = 0  # the bad index contributes nothing
    ref = multi_embedding_bag_reference([w.cpu().double() for w in ws], good.cpu(), off.cpu(), ft, 0, skip, [-1, -1])
    assert_close(out, ref, torch.float32, "bad index skipped")
    with pytest.raises(IndexError, match=r"multi_embedding_bag: indices\[3\] = 9 is out of range \[0, 9\).*"
                                         r"found after that call returned: check='async'"):
        kfuse.embedding_bag(idx[:5], ws[0], torch.tensor([0, 2], device=device), mode="sum", check="async")
    assert not E._DEFERRED
    call(idx, off, check="async")  # raised once: nothing pending now
    kfuse.check_embedding_errors()
    # Bad offsets, found on demand (wait=True waits for the flag).
    spoilt = off.clone()
    spoilt[2] = spoilt[1] - 1
    call(idx, spoilt, check="async")
    with pytest.raises(ValueError, match=r"offsets must be non-decreasing: offsets\[2\].*check='async'"):
        kfuse.check_embedding_errors()
    kfuse.check_embedding_errors()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_async_check_names_the_error_of_its_own_thread(device, monkeypatch, no_pending_checks):
    """embedding_bag renamed the last pending record (_DEFERRED[-1]) as its own: another thread's bad
    multi_embedding_bag call recorded in between got embedding_bag's argument names (review 2026-12-05)."""
    import threading  # noqa: PLC0415

    t = functools.partial(torch.tensor, device=device)
    w = torch.randn(10, 4, device=device)
    run, once = E._run, []

    def run_then_another_thread(*args, **kwargs):
        out = run(*args, **kwargs)
        if once:  # (the other thread's call comes here too)
            return out
        once.append(True)
        other = threading.Thread(target=kfuse.multi_embedding_bag, args=([w], t([1, 12]), t([0, 2])),
                                 kwargs={"backend": "triton", "check": "async"})
        other.start()
        other.join()
        return out

    monkeypatch.setattr(E, "_run", run_then_another_thread)
    kfuse.embedding_bag(t([1, 2]), w, t([0]), mode="sum", backend="triton", check="async")  # valid
    with pytest.raises(IndexError, match=r"multi_embedding_bag: indices\[1\] = 12 is out of range \[0, 10\)"):
        kfuse.check_embedding_errors()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_async_record_is_not_kept_after_it_is_reported(device, no_pending_checks):
    """The thread's last check="async" record (for embedding_bag's naming) was held by a thread-local, with
    its indices, after check_embedding_errors had consumed it (review 2026-12-05)."""
    import gc  # noqa: PLC0415
    import weakref  # noqa: PLC0415

    t = functools.partial(torch.tensor, device=device)
    w = torch.randn(10, 4, device=device)
    idx = t([1, 2, 3])
    kfuse.multi_embedding_bag([w], idx, t([0, 3]), backend="triton", check="async")
    alive = weakref.ref(idx)
    kfuse.check_embedding_errors()
    del idx
    gc.collect()
    assert alive() is None


@pytest.mark.cuda
@pytest.mark.parametrize("check", ["sync", "async"])
def test_forward_captures_in_a_cuda_graph(check, no_pending_checks, monkeypatch):
    """A forward captured after a warm-up: a capture cannot read the kernel's flag ("sync" read it, and
    every call's poll queried the "async" warm-up's event: either invalidated the capture; GPU review,
    2026-12-05). A replay reads the new indices; its bad input reports nothing, and is masked."""
    # An empty metadata cache: a worker whose earlier tests filled it (64 table sets) would build this call's
    # metadata with a host-to-device copy, which the capture refuses (GPU-path audit)
    monkeypatch.setattr(te, "_META_CACHE", {})
    m = MultiTableEmbeddingBag([(9, 5), (6, 3)], backend="triton", check=check, device="cuda")
    idx, off = torch.tensor([1, 2, 3, 4, 5], device="cuda"), torch.tensor([0, 2, 3, 4, 5], device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            m(idx, off)  # warm-up: the metadata cache, the kernel's compile, an async record left pending
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(graph):
            out = m(idx, off)
        idx.copy_(torch.tensor([0, 8, 7, 5, 1]))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, m(idx, off), torch.float32, "replay with new indices")
        idx[4] = 6  # out of table 1's range: masked in the replay, no error from it
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
    kfuse.check_embedding_errors()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_async_check_in_the_modules(device, no_pending_checks):
    m = MultiTableEmbeddingBag([(9, 5), (6, 3)], backend="triton", check="async", device=device)
    fused = MultiTableEmbeddingBag([(9, 5), (6, 3)], backend="triton", check="async", device=device,
                                   optimizer="sgd")
    t = functools.partial(torch.tensor, device=device)
    idx, off = t([1, 2, 3, 4, 5]), t([0, 2, 3, 4, 5])
    bad = t([1, 2, 3, 4, 6])  # feature 1 reads table 1 (6 rows)
    m(bad, off)  # no raise here (with autograd: the tables require grad)
    with pytest.raises(IndexError, match=r"multi_embedding_bag: indices\[4\] = 6 is out of range \[0, 6\) for "
                                         r"feature 1"):
        m(idx, off)
    fused(bad, off).sum().backward()  # the backward skips the bad index too
    with pytest.raises(IndexError, match=r"MultiTableEmbeddingBag: indices\[4\] = 6 is out of range"):
        fused(idx, off)
    single = kfuse.nn.EmbeddingBag(9, 4, mode="sum", backend="triton", check="async", device=device)
    assert "check='async'" in repr(single)
    assert kfuse.nn.EmbeddingBag.from_pretrained(single.weight, check="async").check == "async"
    assert kfuse.nn.EmbeddingBag.from_torch(torch.nn.EmbeddingBag(3, 2), check="async").check == "async"
    single(t([1, 9]), t([0]))
    with pytest.raises(IndexError, match=r"embedding_bag: input\[1\] = 9 is out of range \[0, 9\) \(weight's rows\)"):
        kfuse.check_embedding_errors()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_async_errors_name_the_callers_arguments(device, no_pending_checks):
    """A check="async" error names what the sync one names: embedding_bag's input (1-D or 2-D) and offsets
    (not the flat indices or the len(input) it appends), and the op called, with or without autograd."""
    t = functools.partial(torch.tensor, device=device)
    w = torch.randn(5, 3, device=device)
    eb = functools.partial(kfuse.embedding_bag, mode="sum", backend="triton")
    for check in ("sync", "async"):
        cases = [(lambda c: eb(t([1, 2, 0]), w, t([0, 7]), check=c), ValueError,
                  r"embedding_bag: offsets\[1\] = 7 is past the end of input \(len 3\)"),
                 (lambda c: eb(t([1, 7, 2]), w, t([0, 2]), check=c), IndexError,
                  r"embedding_bag: input\[1\] = 7 is out of range \[0, 5\)"),
                 (lambda c: eb(t([[1, 2], [3, 7]]), w, check=c), IndexError,
                  r"embedding_bag: input\[1, 1\] = 7 is out of range \[0, 5\)")]
        for call, exc, words in cases:
            with pytest.raises(exc, match=words):
                call(check)
                kfuse.check_embedding_errors()
    ws = [torch.randn(5, 3, device=device, requires_grad=True), torch.randn(4, 2, device=device)]
    for check in ("sync", "async"):
        with pytest.raises(IndexError, match=r"^kfuse.multi_embedding_bag: indices\[2\] = 9"):
            kfuse.multi_embedding_bag(ws, t([1, 2, 9]), t([0, 2, 3]), backend="triton", check=check)
            kfuse.check_embedding_errors()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_async_error_is_the_flags_when_the_input_changed(device, no_pending_checks):
    """The indices a check="async" call read may be refilled before its error is found (a staging buffer):
    the error names the position the kernel flagged, and no value it no longer holds."""
    w = [torch.randn(5, 3, device=device)]
    off = torch.tensor([0, 2, 3], device=device)
    for refill, words in (([1, 2, 3], r"indices\[1\] was out of range of its feature's table when that call "
                                      r"read it \(it has changed since\)"),
                          ([1, 2, 8], r"indices\[1\] was out of range")):
        buf = torch.tensor([1, 9, 3], device=device)
        kfuse.multi_embedding_bag(w, buf, off, backend="triton", check="async")
        buf.copy_(torch.tensor(refill))
        with pytest.raises(IndexError, match=words):
            kfuse.check_embedding_errors()
    buf = torch.tensor([1, 9, 3], device=device)  # unchanged: the host's message, with the value
    kfuse.multi_embedding_bag(w, buf, off, backend="triton", check="async")
    with pytest.raises(IndexError, match=r"indices\[1\] = 9 is out of range \[0, 5\) for feature 0"):
        kfuse.check_embedding_errors()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_async_bad_input_never_reaches_the_differentiable_backward(device, no_pending_checks):
    """create_graph=True runs the reference's backward, which would index with the bad indices the kernels
    skipped: the forward's error comes first, once."""
    w = torch.randn(5, 3, device=device, requires_grad=True)
    out = kfuse.multi_embedding_bag([w], torch.tensor([1, 2, 9], device=device), torch.tensor([0, 2, 3], device=device),
                                    backend="triton", check="async")
    with pytest.raises(IndexError, match=r"multi_embedding_bag: indices\[2\] = 9 is out of range"):
        torch.autograd.grad(out.sum(), [w], create_graph=True)
    assert not E._DEFERRED
    kfuse.check_embedding_errors()


@pytest.mark.parametrize(("backend", "device"), backends())
def test_registered_op_called_directly_checks_the_tables(backend, device):
    """torch.ops.kfuse.embedding_bag_forward checks the tables itself (the launchers skip their own pass
    once the op has): a transposed table is refused by name, never read through the wrong strides."""
    t = functools.partial(torch.tensor, device=device)
    good, strided = torch.randn(6, 3, device=device), torch.randn(3, 6, device=device).t()
    with pytest.raises(ValueError, match=r"embedding_bag_forward: weights\[1\] must be contiguous"):
        torch.ops.kfuse.embedding_bag_forward([good, strided], t([0, 1]), t([0, 1, 2]), [0, 1], [-1, -1], 0, None,
                                              backend)


def test_check_must_be_sync_or_async():
    w, idx, off = torch.randn(4, 3), torch.tensor([0, 1]), torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"multi_embedding_bag: check must be one of \('sync', 'async'\); got 'later'"):
        kfuse.multi_embedding_bag([w], idx, off, check="later")
    with pytest.raises(ValueError, match=r"embedding_bag: check must be one of"):
        kfuse.embedding_bag(idx, w, off, check=True)
    with pytest.raises(ValueError, match=r"MultiTableEmbeddingBag: check must be one of"):
        MultiTableEmbeddingBag([(4, 3)], check="never")
    with pytest.raises(ValueError, match=r"nn.EmbeddingBag: check must be one of"):
        kfuse.nn.EmbeddingBag(4, 3, check=None)


def test_triton_bad_arguments_raise():
    w = [torch.randn(4, 3)]
    idx, off = torch.tensor([0, 1]), torch.tensor([0, 2])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        te.forward([torch.randn(4, 3, dtype=torch.float64)], idx, off, [0], [-1], 0, None)
    with pytest.raises(ValueError, match="one dtype"):
        te.forward(w, idx, off.int(), [0], [-1], 0, None)
    with pytest.raises(ValueError, match="F·B"):
        te.forward(w, idx, off, [0, 0], [-1], 0, None)
    with pytest.raises(ValueError, match="grad_out"):
        te.backward_sparse(torch.randn(2, 3), w, idx, off, [0], [-1], 0, None)
    with pytest.raises(ValueError, match="states1"):
        te.backward_fused(torch.randn(1, 3), w, idx, off, [0], [-1], 0, None, "adam", [], [], 0.1, 0.0, 0.9, 0.9,
                          0.0, 1, 0)


# ---------------------------------------------------------------- compiled for sm_90 (no GPU needed)
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the cuda tests compile and run the Triton kernels")
def test_triton_kernels_compile_for_sm90() -> None:
    """Every kernel, as the launchers launch it on a GPU, compiles to sm_90a machine code and fits
    an H200 (``tests/sm90.py``): forward (sum with per-sample weights, mean), the sparse backward,
    the three fused optimizers, the per-sample-weight gradient and the stochastic rounding, for
    fp32 tables with int32 indices, fp16 with int64 and bf16 with int32; three tables of dims 128,
    64 and 300 (the widest tile), and one bag of one index into a one-row, one-column table (sizes
    equal to 1 become constants in a launch's specialisation). The tensors are real CPU tensors
    (the sparse backward reads its run counts on the host); only the launches are compile-only.
    The interpreter never runs the compiler (its type rules, the global-constexpr rule, pointer
    casts)."""
    launches = sm90.run_script("""
import torch
from kfuse.triton_kernels import embedding as te
g = torch.Generator().manual_seed(0)
for wdt, idt in ((torch.float32, torch.int32), (torch.float16, torch.int64), (torch.bfloat16, torch.int32)):
    for rows, dims, B, per_bag in (((5000, 3000, 1000), (128, 64, 300), 256, 6), ((1,), (1,), 1, 1)):
        ws = [torch.zeros(r, d, dtype=wdt) for r, d in zip(rows, dims)]
        ft = list(range(len(ws)))
        idx = torch.cat([torch.randint(0, r, (B * per_bag,), generator=g) for r in rows]).to(idt)
        off = torch.arange(0, len(ft) * B * per_bag + 1, per_bag, dtype=idt)
        pad = [0] + [-1] * (len(ws) - 1)
        psw = torch.ones(idx.shape[0])
        go = torch.zeros(B, sum(dims))
        for pooling, w in ((0, psw), (1, None)):
            te.forward(ws, idx, off, ft, pad, pooling, w)
            te.backward_sparse(go, ws, idx, off, ft, pad, pooling, w)
        for opt in te.OPTIMIZERS:
            full = [torch.zeros_like(w, dtype=torch.float32) for w in ws]
            s1 = {"sgd": [], "rowwise_adagrad": [torch.zeros(r) for r in rows]}.get(opt, full)
            s2 = full if opt == "adam" else []
            te.backward_fused(go, ws, idx, off, ft, pad, 0, psw, opt, s1, s2, 0.1, 1e-8, 0.9, 0.999, 0.0, 1, 0)
        te.backward_psw(go, ws, idx, off, ft, pad)
        if wdt != torch.float32:
            te.stochastic_round(torch.zeros(7, dims[0]), torch.arange(7), wdt, 0, 1, 0)
""")
    assert {launch["kernel"] for launch in launches} == sm90.launched_kernels(te)


# ---------------------------------------------------------------- the report's rows
def test_report_rows_tiny(report_rows, monkeypatch) -> None:
    """``python -m kfuse --ops embedding`` on a tiny medical-like shape on the CPU: every candidate ran
    and passed its check (the forward output against float64), the loop is the basis (ratio 1), the
    CPU targets are set for fp32 tables (forward 1/1.5, train 1/5) and not for half ones, and FBGEMM's
    op says why it has no bf16 tables."""
    from kfuse.bench import embedding as emb_bench  # noqa: PLC0415

    monkeypatch.setitem(emb_bench.SHAPES, "tiny", ((300, 200, 50), 16, 6))
    cpu = torch.device("cpu")
    rows, ran, out = report_rows("embedding", emb_bench, lambda device, quick: [
        emb_bench._case(cpu, dt, m, "tiny", 24) for dt in (torch.float32, torch.float16, torch.bfloat16)
        for m in ("forward", "train")])
    names = {(r["dtype"], r["mode"], r["name"]) for r in ran}
    for dt in ("fp32", "fp16", "bf16"):
        assert names >= {(dt, "forward", "cpu"), (dt, "forward", "loop"), (dt, "train", "cpu"), (dt, "train", "loop"),
                         (dt, "train", "loop-sparse")}, dt
    by = {(r["dtype"], r["mode"], r["name"]): r for r in rows}
    assert by["fp32", "forward", "loop"]["ratio"] == 1.0 and by["fp32", "train", "loop"]["ratio"] == 1.0
    assert by["fp32", "forward", "cpu"]["target"] == pytest.approx(1 / 1.5)
    assert by["fp32", "train", "cpu"]["target"] == 0.2
    assert by["fp16", "forward", "cpu"]["target"] is None and by["bf16", "train", "cpu"]["target"] is None
    if importlib.util.find_spec("fbgemm_gpu") is not None:
        assert ("fp16", "train", "fbgemm") in names
        assert "no torch.bfloat16 tables" in by["bf16", "forward", "fbgemm"]["note"]
    assert by["fp32", "forward", "cpu"]["gbps"] > 0 and "%copy" in out
    # the forward with cold caches too (the main CPU time is warm); the other targets as goals
    cold = by["fp32", "forward", "cpu"]["extra"]
    assert cold["cold GB/s"] > 0 and cold["cold %copy"] > 0 and "cold GB/s" not in by["fp32", "train", "cpu"]["extra"]
    assert by["fp32", "forward", "cpu"]["goals"].keys() == {"fbgemm"} and by["fp16", "forward", "cpu"]["goals"] == {}
    assert by["fp32", "train", "cpu"]["goals"]["fbgemm"][0] == 3.0
    assert ("fp32", "train", "compile") in names
    if ("fp32", "train", "fbgemm") in names:
        aim, got = by["fp32", "train", "cpu"]["goals"]["fbgemm"]
        assert got == pytest.approx(by["fp32", "train", "cpu"]["speedup"]["fbgemm"])
        assert "xfbgemm >= 3: " in out


def test_sparse_index_tensors_are_refused_by_name():
    """A sparse COO indices, offsets or per_sample_weights passed the shape checks and failed deep inside
    ("unsupported memory format option Contiguous", or an aten fill_ with no SparseCPU kernel; bad-input fuzz,
    2026-12-05): each is refused, named."""
    w, i, o = torch.randn(6, 4), torch.tensor([0, 5, 1]), torch.tensor([0, 2])
    psw = torch.ones(3)
    for name, kw in (("input", dict(input=i.to_sparse(), offsets=o)), ("offsets", dict(input=i, offsets=o.to_sparse())),
                     ("per_sample_weights", dict(input=i, offsets=o, per_sample_weights=psw.to_sparse()))):
        with pytest.raises(ValueError, match=rf"kfuse.embedding_bag: {name} must be a dense \(strided\) tensor"):
            kfuse.embedding_bag(weight=w, mode="sum", **kw)
    off = torch.tensor([0, 2, 3])
    for name, args, kw in (("indices", (i.to_sparse(), off), {}), ("offsets", (i, off.to_sparse()), {}),
                           ("per_sample_weights", (i, off), dict(per_sample_weights=psw.to_sparse()))):
        with pytest.raises(ValueError, match=rf"kfuse.multi_embedding_bag: {name} must be a dense \(strided\)"):
            kfuse.multi_embedding_bag([w], *args, **kw)


# ---------------------------------------------------------------- the CPU fast path (E._cpu_fast)
def _fast_spy(monkeypatch):
    """Records what each call's E._cpu_fast returned: a tensor (the fast path ran) or None."""
    seen = []
    fast = E._cpu_fast
    monkeypatch.setattr(E, "_cpu_fast", lambda *a: seen.append(fast(*a)) or seen[-1])
    return seen


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_cpu_fast_path_gives_the_full_paths_bits(dtype, index_dtype, mode, monkeypatch):
    """The common eager CPU calls (plain tables, indices and offsets; no per-sample weights, padding or feature
    map; nothing to differentiate) go straight to the extension, where the full path's Python took 12 µs of a
    single-table call warm and ~85 µs cold (bench/results/2026-12-06-cpu-embedding-single-table.md); the
    output is the full path's, bit for bit: both ops, odd dims, empty bags, no bags, tables requiring grad
    under no_grad, the modules in eval under no_grad."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(r, d, generator=g).to(dtype) for r, d in ((11, 5), (7, 17), (30, 1))]
    lens = torch.tensor([3, 0, 1, 4, 2, 0, 5, 1, 1], dtype=torch.int64)  # 3 features x 3 bags, empty ones
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(index_dtype)
    rows = [11] * 4 + [7] * 6 + [30] * 7
    indices = torch.tensor([int(torch.randint(0, r, (), generator=g)) for r in rows], dtype=index_dtype)
    single_off = torch.tensor([0, 2, 2, 5], dtype=index_dtype)
    calls = [lambda: kfuse.multi_embedding_bag(ws, indices, offsets, mode=mode),
             lambda: kfuse.multi_embedding_bag(ws, indices[:0], torch.zeros(1, dtype=index_dtype), mode=mode),
             lambda: kfuse.embedding_bag(indices[:6] % 11, ws[0], single_off[:-1], mode=mode),
             lambda: kfuse.embedding_bag(indices[:5] % 11, ws[0], single_off, mode=mode, include_last_offset=True),
             # 2-D input (bags of equal length; none long too) and per-sample weights: the full path before (CPU
             # hunt, 2026-12-07: 1.6-3.4x torch's time at small sizes)
             lambda: kfuse.embedding_bag((indices[:6] % 11).view(2, 3), ws[0], mode=mode),
             lambda: kfuse.embedding_bag((indices[:6] % 11).view(3, 2)[:, :0], ws[0], mode=mode)]
    if mode == "sum":
        psw = torch.randn(6, generator=g).to(dtype)
        calls += [lambda: kfuse.embedding_bag(indices[:6] % 11, ws[0], single_off[:-1], per_sample_weights=psw,
                                              mode="sum"),
                  lambda: kfuse.embedding_bag((indices[:6] % 11).view(2, 3), ws[0], per_sample_weights=psw.view(2, 3),
                                              mode="sum")]
    seen = _fast_spy(monkeypatch)
    fast = [c() for c in calls]
    assert all(isinstance(t, torch.Tensor) for t in seen) and len(seen) == len(calls)
    with monkeypatch.context() as m:
        m.setattr(E, "_cpu_fast", lambda *a: None)
        full = [c() for c in calls]
    for a, b in zip(fast, full, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    params = [torch.nn.Parameter(w) for w in ws]
    with torch.no_grad():
        assert torch.equal(kfuse.multi_embedding_bag(params, indices, offsets, mode=mode), fast[0])
    assert isinstance(seen[-1], torch.Tensor)
    multi = MultiTableEmbeddingBag([(11, 5), (7, 17), (30, 1)], mode=mode).to(dtype).eval()
    with torch.no_grad():
        for t, w in zip(multi.weights, ws, strict=True):
            t.copy_(w)
        assert torch.equal(multi(indices, offsets), fast[0])
    assert isinstance(seen[-1], torch.Tensor)
    if dtype != torch.float64:
        emb = kfuse.nn.EmbeddingBag(11, 5, mode=mode).to(dtype).eval()
        with torch.no_grad():
            got = emb(indices[:6] % 11, single_off[:-1])
        assert isinstance(seen[-1], torch.Tensor)
        with monkeypatch.context() as m:
            m.setattr(E, "_cpu_fast", lambda *a: None)
            with torch.no_grad():
                assert torch.equal(got, emb(indices[:6] % 11, single_off[:-1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("sparse", [False, True])
def test_cpu_fast_path_with_grad_gives_the_full_paths_gradients(dtype, index_dtype, mode, sparse, monkeypatch):
    """Tables that need a gradient take the fast path under autograd (_CpuFastEmbeddingBag: the full path's ~130 µs
    of Python a forward made nn.EmbeddingBag 1.7x torch's time, 100k x 64, 512 bags of 20); outputs and gradients
    (dense and sparse, per-sample weights that need none, 2-D input, include_last_offset, a computed table,
    create_graph=True) are the full path's, bit for bit."""
    g = torch.Generator().manual_seed(1)
    shapes = ((11, 5), (7, 17), (30, 1))
    base = [torch.randn(r, d, generator=g).to(dtype) for r, d in shapes]
    lens = torch.tensor([3, 0, 1, 4, 2, 0, 5, 1, 1], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(index_dtype)
    rows = [11] * 4 + [7] * 6 + [30] * 7
    indices = torch.tensor([int(torch.randint(0, r, (), generator=g)) for r in rows], dtype=index_dtype)
    single, single_off = indices[:6] % 11, torch.tensor([0, 2, 2, 5], dtype=index_dtype)
    psw = torch.randn(6, generator=g).to(dtype)
    scale = torch.randn((), generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    calls = [lambda ws: kfuse.multi_embedding_bag(ws, indices, offsets, mode=mode, sparse=sparse),
             lambda ws: kfuse.embedding_bag(single, ws[0], single_off[:-1], mode=mode, sparse=sparse),
             lambda ws: kfuse.embedding_bag(single[:5], ws[0], single_off, mode=mode, include_last_offset=True,
                                            sparse=sparse),
             lambda ws: kfuse.embedding_bag(single.view(2, 3), ws[0], mode=mode, sparse=sparse)]
    if mode == "sum":
        calls += [lambda ws: kfuse.embedding_bag(single, ws[0], single_off[:-1], per_sample_weights=psw,
                                                 mode="sum", sparse=sparse)]
    if not sparse:  # a computed table (sparse gradients are for leaves): its gradient flows on to scale
        calls += [lambda ws: kfuse.embedding_bag(single, ws[0] * scale, single_off[:-1], mode=mode)]

    def run(call):
        ws = [w.clone().requires_grad_() for w in base]
        out = call(ws)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        out.backward(grad_out)
        grads = [w.grad.to_dense() if w.grad is not None and w.grad.is_sparse else w.grad for w in ws]
        if not sparse:  # create_graph=True: the reference's vjp, as on the full path
            ws2 = [w.detach().requires_grad_() for w in base]
            grads.append(torch.autograd.grad(call(ws2), ws2[0], grad_out, create_graph=True)[0])
        return out, grads, type(out.grad_fn).__name__

    seen = _fast_spy(monkeypatch)
    fast = []
    for c in calls:
        scale.grad = None
        fast.append((*run(c), scale.grad))
    with monkeypatch.context() as m:
        m.setattr(E, "_cpu_fast", lambda *a: None)
        full = []
        for c in calls:
            scale.grad = None
            full.append((*run(c), scale.grad))
    for (out, grads, node, sg), (want, want_grads, want_node, want_sg) in zip(fast, full, strict=True):
        assert node == "_CpuFastEmbeddingBagBackward" and want_node == "_EagerEmbeddingBagBackward"
        assert out.dtype == want.dtype and torch.equal(out, want)
        for a, b in zip(grads, want_grads, strict=True):
            assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and torch.equal(a, b)))
        assert (sg is None) == (want_sg is None) and (sg is None or torch.equal(sg, want_sg))
    assert all(isinstance(t, torch.Tensor) for t in seen[:len(calls)])


def test_cpu_fast_path_with_grad_keeps_the_full_paths_table_semantics(monkeypatch):
    """What the full path's autograd.Function promises holds on the fast path: a leaf table updated in place between
    forward and backward (another optimizer's step on a shared table) gets its gradient, as with torch; a computed
    table updated in place is refused by autograd's version check; a table no gradient is asked of gets none."""
    i, o = torch.tensor([0, 5, 1, 2, 5]), torch.tensor([0, 2])
    seen = _fast_spy(monkeypatch)
    w = torch.randn(6, 4, requires_grad=True)
    out = kfuse.embedding_bag(i, w, o, mode="sum")
    assert seen[-1] is out
    with torch.no_grad():
        w.add_(1.0)
    out.sum().backward()
    want = torch.zeros(6, 4).index_add_(0, i, torch.ones(5, 4))
    assert torch.equal(w.grad, want)
    computed = w * 2
    out = kfuse.embedding_bag(i, computed, o, mode="sum")
    assert seen[-1] is out
    with torch.no_grad():
        computed.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    a, b = torch.randn(6, 4, requires_grad=True), torch.randn(3, 2)
    out = kfuse.multi_embedding_bag([a, b], torch.tensor([1, 2, 0]), torch.tensor([0, 2, 3]))
    assert seen[-1] is out
    out.sum().backward()
    assert b.grad is None and torch.equal(a.grad, torch.zeros(6, 4).index_add_(0, torch.tensor([1, 2]),
                                                                              torch.ones(2, 4)))


def test_cpu_fast_path_serves_sparse_modules_without_grad(monkeypatch):
    """sparse=True shapes only the gradient: with nothing to differentiate (no_grad) the module's call takes the
    fast path (it took the full path's 1.3x time: CPU hunt, 2026-12-07); with grad it takes it under autograd and
    the table's gradient is sparse; a sparse that is not a bool still raises."""
    m = kfuse.nn.EmbeddingBag(9, 5, mode="sum", sparse=True)
    i, o = torch.tensor([0, 8, 3, 3, 1]), torch.tensor([0, 2])
    seen = _fast_spy(monkeypatch)
    want = F.embedding_bag(i, m.weight.detach(), o, mode="sum")
    with torch.no_grad():
        out = m(i, o)
    assert seen[-1] is not None and torch.equal(out, want)
    out = m(i, o)
    assert seen[-1] is out and type(out.grad_fn).__name__ == "_CpuFastEmbeddingBagBackward"
    assert torch.equal(out.detach(), want)
    out.sum().backward()
    assert m.weight.grad.is_sparse
    with pytest.raises(TypeError, match="sparse must be a bool"):
        kfuse.embedding_bag(i, m.weight.detach(), o, mode="sum", sparse="yes")


def test_cpu_fast_path_declines_what_it_does_not_serve(monkeypatch):
    """Calls the fast path must not take run the full path: per-sample weights that require grad under grad mode,
    a negated view or strided indices (the full path resolves them), a tensor subclass, the reference backend,
    a dispatch mode, a jit trace (both record the registered op); and bad input still raises the full path's
    error, naming the argument, with or without gradients."""
    w = torch.randn(6, 4)
    i, o = torch.tensor([0, 5, 1, 2]), torch.tensor([0, 2])
    seen = _fast_spy(monkeypatch)

    def last_declined(out, want):
        assert seen[-1] is None and torch.equal(out, want)

    want = F.embedding_bag(i, w, o, mode="sum")
    last_declined(kfuse.embedding_bag(torch._neg_view(-i), w, o, mode="sum"), want)
    strided = torch.stack([i, i], 1)[:, 0]
    last_declined(kfuse.embedding_bag(strided, w, o, mode="sum"), want)
    n = len(seen)
    kfuse.embedding_bag(i, w, o, mode="sum", backend="reference")
    assert len(seen) == n + 1 and seen[-1] is None

    class Sub(torch.Tensor):
        pass

    kfuse.multi_embedding_bag([w], i.as_subclass(Sub), torch.tensor([0, 2, 4]))
    assert seen[-1] is None

    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415

    class Log(TorchDispatchMode):  # a dispatch mode sees every op: the registered op's, not the extension's call
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Log():
        out = kfuse.embedding_bag(i, w, o, mode="sum")
    assert seen[-1] is None and torch.equal(out, want)
    traced = torch.jit.trace(lambda i, o: kfuse.embedding_bag(i, w, o, mode="sum"), (i, o), check_trace=False)
    assert seen[-1] is None and "kfuse" in str(traced.graph)
    for ft in ([0, 0], [np.int64(0)], [True]):  # a shared table; and what the full path takes or refuses itself
        n = len(seen)
        with contextlib.suppress(ValueError):
            kfuse.multi_embedding_bag([w] * len(ft), i, torch.tensor([0, 2, 4][-len(ft) - 1:]), feature_table=ft)
        assert len(seen) == n, ft
    psw = torch.randn(4)
    for bad, err in (({"mode": "mean"}, "only supported with mode='sum'"),
                     ({"per_sample_weights": psw.double()}, "must have the tables' dtype"),
                     ({"per_sample_weights": psw[:3]}, "one weight per index")):
        with pytest.raises((ValueError, TypeError), match=err):
            kfuse.embedding_bag(i, w, o, **{"per_sample_weights": psw, "mode": "sum", **bad})
        assert seen[-1] is None
    out = kfuse.embedding_bag(i, w, o, mode="sum", per_sample_weights=psw.clone().requires_grad_())
    assert seen[-1] is None and out.requires_grad  # (the weights' gradient: autograd)
    with pytest.raises(TypeError, match="backend must be a str"):
        kfuse.embedding_bag(i, w, o, backend=np.array(["auto", "cpu"]))
    for table in (w, w.clone().requires_grad_()):
        with pytest.raises(IndexError, match=r"kfuse.embedding_bag: input\[1\] = 9 is out of range \[0, 6\)"):
            kfuse.embedding_bag(torch.tensor([0, 9]), table, o, mode="sum")
        assert seen[-1] is None
    with pytest.raises(ValueError, match=r"kfuse.multi_embedding_bag: offsets must be non-decreasing"):
        kfuse.multi_embedding_bag([w], i, torch.tensor([0, 3, 2, 4]))
