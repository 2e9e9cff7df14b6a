"""Shared launch plumbing (kfuse._backends) that no single op's tests reach on a CPU machine."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import threading
import time

import torch

from kfuse import _backends
from kfuse.triton_kernels import deu, embedding, kv, lora


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (no GPU needed to test the device guard)."""

    @property
    def is_cuda(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 1)


def test_triton_launchers_run_on_their_inputs_device(monkeypatch) -> None:
    """Triton launches on the current CUDA device, so a launcher given tensors on cuda:1 while cuda:0 is
    current must switch to cuda:1 (its first tensor, or its first list's first tensor), and must not
    switch when that device is already current."""
    entered: list[torch.device] = []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []
    launch = _backends.on_input_device(lambda *args, **kwargs: seen.append((args, kwargs)) or "done")
    t = torch.zeros(2).as_subclass(_OnCuda1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert launch(t, 3, flag=True) == "done" and entered == [torch.device("cuda", 1)]
    assert launch([t, t], 3) == "done" and len(entered) == 2  # a list of tables: its first tensor
    assert launch(torch.zeros(2), 3) == "done" and len(entered) == 2  # CPU tensors: nothing to switch
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert launch(t) == "done" and len(entered) == 2  # already current
    assert len(seen) == 4
    # Every public Triton launcher is guarded.
    launchers = [lora.lora_forward, lora.lora_backward, lora.lora_multi_forward, lora.lora_shrink,
                 lora.lora_dropout_mask, kv.paged_decode, kv.paged_prefill, embedding.forward,
                 embedding.backward_sparse, embedding.backward_fused, embedding.backward_psw,
                 embedding.stochastic_round, deu.deu_forward, deu.deu_backward]
    assert all(f.__code__ is launch.__code__ for f in launchers)


def test_tracing_and_backend_argument_rules_shared_by_every_op(monkeypatch) -> None:
    """Every public op hands FX proxies to __torch_function__ (one call in the traced graph: the embedding
    ops validated first and refused the Proxy); the KV ops, which take a cache object FX cannot record,
    say so; a non-str backend is a TypeError in every op (the embedding ops raised ValueError); a
    TRITON_INTERPRET that differs from the one the kernels were loaded with is a reason, not an obscure
    launch failure."""
    import pytest  # noqa: PLC0415

    import kfuse  # noqa: PLC0415
    from kfuse.kv import PagedKVCache  # noqa: PLC0415

    class Bags(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(10, 4))

        def forward(self, i, o, o2):  # o: bag starts (torch's form); o2: the FBGEMM form, ending at len(i)
            return kfuse.embedding_bag(i, self.w, o, mode="sum") + kfuse.multi_embedding_bag([self.w], i, o2)

    m = Bags()
    g = torch.fx.symbolic_trace(m)
    calls = [n.target for n in g.graph.nodes if n.op == "call_function"]
    assert kfuse.embedding_bag in calls and kfuse.multi_embedding_bag in calls
    i, o = torch.tensor([1, 2, 3]), torch.tensor([0, 2])
    assert torch.equal(g(i, o, torch.tensor([0, 2, 3])), m(i, o, torch.tensor([0, 2, 3])))
    cache = PagedKVCache(1, 1, 4, 4, 4, 1, torch.float32, "cpu")

    class Attend(torch.nn.Module):
        def forward(self, q):
            return kfuse.paged_decode_attention(q, cache, 0, [0])

    with pytest.raises(TypeError, match="symbolic_trace cannot record a call that takes a PagedKVCache"):
        torch.fx.symbolic_trace(Attend())
    for call in (lambda b: kfuse.embedding_bag(i, m.w, o, backend=b), lambda b: kfuse.deu(torch.randn(2, 3),
                                                                                          torch.rand(3, 5), backend=b)):
        with pytest.raises(TypeError, match="backend must be a str"):
            call(None)
    import kfuse.triton_kernels as tk  # noqa: PLC0415

    monkeypatch.setattr(tk, "INTERPRETED", not _backends.triton_interpret())
    why = _backends.triton_reasons(torch.device("cpu"), torch.float32)
    assert why and "which triton.jit reads once" in why[0]


def _runs_without_the_gil(call) -> bool:
    """Whether another Python thread ran while ``call()`` was inside its kernel: the thread sleeps 0.5 ms
    (without the GIL) and then needs it to take a timestamp. A kernel that keeps the GIL makes the stamp
    wait until it returns, always; one that releases it lets the stamp fall early in the call, unless
    the machine is too busy to wake the thread in time (hence up to 10 tries). The sleep was 2 ms: on a
    Zen 4 VM the embedding call took 2.7 ms, so its stamp could never fall in the first half (CI failed)."""
    def other(started: threading.Event, stamp: list[float]) -> None:
        started.set()
        time.sleep(0.0005)
        stamp.append(time.perf_counter())

    for _ in range(10):
        started, stamp = threading.Event(), []
        thread = threading.Thread(target=other, args=(started, stamp))
        thread.start()
        started.wait()
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        thread.join()
        # In the call's first half: a thread waiting for the GIL takes it as soon as the call returns,
        # before this thread reads t1, so "before t1" alone does not tell.
        if t0 < stamp[0] < t0 + (t1 - t0) / 2:
            return True
    return False


def test_cpu_kernels_release_the_gil() -> None:
    """The C++ kernels run without the GIL, as torch's ops do: other Python threads (a server's, a
    data loader's) go on meanwhile; they stalled for the kernel's whole length (bug hunt). One kernel
    of each op family on one thread, each call some tens of ms."""
    import kfuse  # noqa: PLC0415
    from kfuse.kv import PagedKVCache  # noqa: PLC0415
    from kfuse.reference.deu import deu_init_coeffs  # noqa: PLC0415

    ext = _backends.extension()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 4096, generator=g)
    coeffs = deu_init_coeffs(4096, generator=g)
    table = torch.randn(50_000, 128, generator=g)
    idx = torch.randint(0, 50_000, (1_000_000,), generator=g)  # ~13 ms (200k took 2.7 ms on a Zen 4 VM)
    cache = PagedKVCache(1, 2, 64, 16, 2048, 8, torch.float32, "cpu")
    ids = [cache.add_sequence() for _ in range(8)]
    cache.append(0, ids, torch.randn(8 * 4096, 2, 64, generator=g), torch.randn(8 * 4096, 2, 64, generator=g),
                 [4096] * 8)
    cache.advance(ids, [4096] * 8)
    q = torch.randn(8, 8, 64, generator=g)
    calls = {
        "deu_forward": lambda: ext.deu_forward(x, coeffs, 1),
        "embedding_forward": lambda: ext.embedding_forward([table], idx, torch.tensor([0, 1_000_000]), [0], [-1], 0,
                                                           None),
        "kv_decode_attention": lambda: kfuse.paged_decode_attention(q, cache, 0, ids, backend="cpu"),
    }
    # The detector itself: a C call that keeps the GIL (ctypes.PyDLL does not release it) is caught.
    assert not _runs_without_the_gil(lambda: ctypes.PyDLL(None).usleep(30_000))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        held = [name for name, call in calls.items() if not _runs_without_the_gil(call)]
    finally:
        torch.set_num_threads(threads)
    assert held == [], f"these kernels kept the GIL: {held}"


def test_triton_interpret_read_as_triton_reads_it(monkeypatch) -> None:
    """TRITON_INTERPRET=true put Triton in interpreter mode while kfuse, reading only "1", refused CPU
    tensors and skipped its interpreter guards (bug hunt)."""
    knobs = None
    with contextlib.suppress(ImportError):
        from triton import knobs  # noqa: PLC0415
    for value, on in (("1", True), ("true", True), ("True", True), ("on", True), ("yes", True), ("y", True),
                      ("0", False), ("false", False), ("off", False), ("", False), ("2", False),
                      ("1 ", False), (" true", False)):  # unstripped, as Triton (kfuse stripped: globals hunt)
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert _backends.triton_interpret() is on, value
        if knobs is not None and hasattr(knobs, "getenv_bool"):
            assert knobs.getenv_bool("TRITON_INTERPRET", False) is on, value


def test_an_unbuilt_extension_says_so(tmp_path) -> None:
    """A checkout without kfuse._C reported "not built or failed to load (cannot import name '_C' from
    partially initialized module 'kfuse' (most likely due to a circular import))" (bug hunt): it says
    it is not built, and how to build it. (A copy of the package, the editable install's finder left
    out, so that the venv's build is not found.)"""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    src = Path(_backends.__file__).parent
    shutil.copytree(src, tmp_path / "kfuse", ignore=shutil.ignore_patterns("_C.*", "__pycache__", "triton_kernels"))
    code = ("import sys; sys.meta_path = [f for f in sys.meta_path "
            "if not getattr(f, '__module__', '').startswith('__editable')]; "
            "import kfuse; print(kfuse.availability()['cpu'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "kfuse._C is not built: build it with `make build`" in out.stdout, out.stdout


def test_import_loads_neither_dynamo_nor_the_optional_packages() -> None:
    """``import kfuse`` needs torch and numpy only, and stays cheap: two ``@torch.compiler.disable`` decorators in
    kfuse.nn.embedding imported Dynamo (with sympy and triton) at import, 1.05 of ``import kfuse``'s 1.17 s on top of
    torch's own 1.2 s (2-core VM, torch 2.14; now 0.1 s). They are ``torch._disable_dynamo``'s now, which imports
    Dynamo at the fused optimizer's first step only. Triton, transformers and peft are optional (test/bench
    dependencies); the ops' eager calls load none of them either."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    heavy = ("torch._dynamo", "sympy", "triton", "transformers", "peft", "torch.utils.flop_counter")  # (see _flops)
    code = ("import sys, torch, kfuse, kfuse.kv\n"
            "x = torch.randn(3, 8, requires_grad=True)\n"
            "kfuse.deu(x, torch.randn(8, 5)).sum().backward()\n"
            "kfuse.lora_linear(x, torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2), 0.5).sum().backward()\n"
            "m = kfuse.nn.MultiTableEmbeddingBag([(9, 4), (7, 4)])\n"
            "m(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2, 3, 3])).sum().backward()\n"
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_no_grad_eager_calls_are_named_in_a_profiler_trace() -> None:
    """The eager calls with nothing to differentiate run their kernels with no autograd node and outside the
    dispatcher: under torch.profiler their time had no event naming them (modes-and-hooks hunt, 2026-12-07)."""
    import kfuse  # noqa: PLC0415
    from kfuse.kv import PagedKVCache  # noqa: PLC0415

    cache = PagedKVCache(1, 2, 8, 4, 8, 2)
    s = cache.add_sequence()
    cache.append(0, [s], torch.randn(3, 2, 8), torch.randn(3, 2, 8), [3])
    cache.advance([s], [3])
    x = torch.randn(4, 8)
    calls = {
        "kfuse.deu": lambda: kfuse.deu(x, torch.randn(8, 5)),
        "kfuse.lora_linear": lambda: kfuse.lora_linear(x, torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2), 0.5),
        "kfuse.lora_linear_multi": lambda: kfuse.lora_linear_multi(
            x, torch.randn(6, 8), torch.randn(2, 2, 8), torch.randn(2, 6, 2), torch.ones(2),
            torch.tensor([2, 1], dtype=torch.int32), torch.tensor([0, -1, 1, 0])),
        "kfuse.embedding_bag": lambda: kfuse.embedding_bag(torch.tensor([1, 2]), torch.randn(5, 3), torch.tensor([0])),
        "kfuse.multi_embedding_bag": lambda: kfuse.multi_embedding_bag(
            [torch.randn(5, 3)], torch.tensor([1, 2]), torch.tensor([0, 2]), padding_idx=0),
        "kfuse.paged_decode_attention": lambda: kfuse.paged_decode_attention(torch.randn(1, 4, 8), cache, 0, [s]),
        "kfuse.paged_prefill_attention": lambda: kfuse.paged_prefill_attention(torch.randn(1, 4, 8), cache, 0, [s],
                                                                               [1]),
    }
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for call in calls.values():
            call()
    names = {e.key for e in prof.key_averages()}
    assert set(calls) <= names, sorted(set(calls) - names)


def test_torch_older_than_the_tested_floor_is_named_at_import() -> None:
    """pyproject.toml said torch >= 2.4, but under torch 2.8 torch.compile, autocast and the Triton kernels' compile
    failed (2026-12-06); the floor is now the oldest torch the suite passed on, and a torch installed past pip's
    check is named at import (a warning: the eager ops may still serve). The current torch imports silently."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    code = ("import warnings, torch\n{}warnings.simplefilter('error')\nimport kfuse\nprint('ok')")
    old = subprocess.run([sys.executable, "-c", code.format("torch.__version__ = '2.8.0+cu128'\n")],
                         capture_output=True, text=True, timeout=120)
    assert old.returncode != 0 and "RuntimeWarning: kfuse needs torch >= 2.11; found 2.8.0+cu128" in old.stderr
    now = subprocess.run([sys.executable, "-c", code.format("")], capture_output=True, text=True, timeout=120)
    assert now.returncode == 0 and now.stdout.strip() == "ok", now.stderr


def test_triton_older_than_the_tested_floor_is_a_reason(monkeypatch) -> None:
    """An installed Triton older than kfuse._backends.MIN_TRITON (Triton 3.4 failed the sm_90 compile test) is the
    triton backend's reason, read from the package's metadata without importing it; a Triton of another
    distribution (a nightly's pytorch-triton) is not judged."""
    import importlib.metadata  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415

    from kfuse import _backends  # noqa: PLC0415

    def version(v):
        def get(dist):
            assert dist == "triton"
            if v is None:
                raise importlib.metadata.PackageNotFoundError(dist)
            return v
        return get

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(importlib.metadata, "version", version("3.4.0"))
    assert _backends._triton_why() == "triton 3.4.0 is installed; kfuse's Triton kernels need triton >= 3.6"
    for ok in ("3.6.0", "3.8.0", "3.10.1", None):
        monkeypatch.setattr(importlib.metadata, "version", version(ok))
        assert _backends._triton_why() == ""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert _backends._triton_why() == "triton is not installed"


def test_registered_ops_refuse_a_meta_tensor_among_real_ones():
    """A call of a registered op mixing one meta tensor with CPU ones dispatches to the op's fake kernel, which
    returned its empty output as a real, uninitialised CPU tensor (values like -1e37, no error: bad-input fuzz,
    2026-12-05). Every fake kernel checks that its tensors share one device, naming the one that does not."""
    import pytest  # noqa: PLC0415

    import kfuse  # noqa: PLC0415

    ops = torch.ops.kfuse
    meta = functools.partial(torch.Tensor.to, device="meta")
    x, c, gy = torch.randn(4, 6), torch.rand(6, 5) + 0.5, torch.randn(4, 6)
    xx, w, a, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    tables, idx, off = [torch.randn(6, 4), torch.randn(5, 3)], torch.tensor([0, 5, 1, 2, 4, 0, 3]), torch.tensor(
        [0, 2, 3, 5, 7])
    cache = kfuse.kv.PagedKVCache(1, 1, 4, 4, 4, 2)
    q, ids, lens = torch.randn(1, 1, 4), torch.tensor([0], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    calls = {
        "coeffs": lambda: ops.deu_forward(x, meta(c), 1, "cpu"),
        "grad_y": lambda: ops.deu_backward(meta(gy), x, c, 1, "cpu"),
        "weight": lambda: ops.lora_forward(xx, meta(w), a, b, 0.5, None, None, 0.0, False, "cpu"),
        "offsets": lambda: ops.embedding_bag_forward(tables, idx, meta(off), [0, 1], [-1, -1], 0, None, "cpu"),
        "weights[1]": lambda: ops.embedding_bag_forward([tables[0], meta(tables[1])], idx, off, [0, 1], [-1, -1], 0,
                                                        None, "cpu"),
        "block_table": lambda: ops.paged_decode_attention(q, cache.k_pages, cache.v_pages, meta(cache.block_table), 0,
                                                          ids, lens, 1, 0.5, "cpu"),
    }
    for name, call in calls.items():
        n = re.escape(name)
        with pytest.raises(ValueError, match=rf"({n} is on meta but \S+ is on cpu|\S+ is on cpu but {n} is on meta)"):
            call()


def test_registered_ops_check_their_arguments_as_the_public_ops_do():
    """The registered ops are public (torch.ops.kfuse) and reach the kernels; called directly with bad
    arguments they raised from deep inside (a DEU dim out of range: "5 is not in list"; an integer x: "kfuse:
    unsupported dtype Int"; pooling=5 on the reference backend: a tuple index out of range; a LoRA grad_y of
    another width: a matmul's shape error; no tables: a list index out of range) or cast silently (integer or
    complex coeffs; bad-input fuzz, 2026-12-05). They check as the public ops do, naming the argument."""
    import pytest  # noqa: PLC0415

    ops = torch.ops.kfuse
    x, c = torch.randn(4, 6), torch.rand(6, 5) + 0.5
    xx, w, a, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    tables, idx, off = [torch.randn(6, 4)], torch.tensor([0, 5, 1]), torch.tensor([0, 2, 3])
    y, S, seed = ops.lora_forward(xx, w, a, b, 0.5, None, None, 0.0, False, "cpu")
    calls = [
        (IndexError, r"kfuse.deu: dim must be an int in \[-2, 1\]", lambda: ops.deu_forward(x, c, 5, "cpu")),
        (TypeError, r"kfuse.deu: x must be float16, bfloat16, float32 or float64; got torch.int32",
         lambda: ops.deu_forward(x.int(), c, 1, "cpu")),
        (TypeError, r"kfuse.deu: coeffs must be float16", lambda: ops.deu_forward(x, c.to(torch.complex64), 1, "cpu")),
        (ValueError, r"kfuse.deu_backward: grad_y must have x's shape",
         lambda: ops.deu_backward(torch.randn(4, 5), x, c, 1, "cpu")),
        (ValueError, r"kfuse.lora_backward: grad_y must be \[..., N = 5\]",
         lambda: ops.lora_backward(torch.randn(3, 4), xx, w, a, b, 0.5, S, seed, 0.0, False, True, False, True,
                                   True, False, False, "cpu")),
        (ValueError, r"kfuse.embedding_bag_forward: pooling must be 0 \(sum\) or 1 \(mean\); got 5",
         lambda: ops.embedding_bag_forward(tables, idx, off, [0], [-1], 5, None, "reference")),
        (ValueError, r"kfuse.embedding_bag_forward: padding_idx must hold one row per table",
         lambda: ops.embedding_bag_forward(tables, idx, off, [0], [-1, 2], 0, None, "reference")),
        (TypeError, r"kfuse.embedding_bag_backward: weights must be a non-empty list",
         lambda: ops.embedding_bag_backward(torch.randn(2, 4), [], idx, off, [0], [], 0, None, False, "cpu")),
        (ValueError, r"kfuse.embedding_bag_backward: grad_out must be \[2, 4\]",
         lambda: ops.embedding_bag_backward(torch.randn(2, 3), tables, idx, off, [0], [-1], 0, None, False, "cpu")),
        (TypeError, r"kfuse.embedding_bag_forward: per_sample_weights must be in the accumulation dtype",
         lambda: ops.embedding_bag_forward([t.half() for t in tables], idx, off, [0], [-1], 0, torch.ones(3).half(),
                                           "reference")),
        (ValueError, r"kfuse.embedding_bag_backward: need_psw=True needs per_sample_weights",
         lambda: ops.embedding_bag_backward(torch.randn(2, 4), tables, idx, off, [0], [-1], 0, None, True,
                                            "reference")),
    ]
    for error, message, call in calls:
        with pytest.raises(error, match=message):
            call()


# Run in a subprocess per ISA (KFUSE_CPU_ISA is read once per process): DEU's tile kernels and the
# embedding forward have one entry per ISA, each with its own vector width (cpu_isa.h), and the rest of
# the suite runs only the one this CPU picks.
_ISA_CHECK = """
import sys

import torch
import torch.nn.functional as F

import kfuse
from kfuse import _backends
from kfuse.reference.deu import deu_reference

sys.path.insert(0, sys.argv[1])
from tolerances import assert_close

print(_backends.extension().cpu_isa())
g = torch.Generator().manual_seed(0)
# DEU forward and backward: lanes over neurons (37: whole and partial lane blocks) and along K (K = 9 and 37).
for shape, dim in (((6, 37), -1), ((3, 5, 9), 1), ((2, 3, 37), 1)):
    x = torch.randn(shape, generator=g) * 3
    co = torch.randn(shape[dim], 5, generator=g)
    gy = torch.randn(shape, generator=g)
    got = []
    for xx, cc, backend in ((x, co, "cpu"), (x.double(), co.double(), "reference")):
        xx, cc = xx.clone().requires_grad_(), cc.clone().requires_grad_()
        y = kfuse.deu(xx, cc, dim, backend=backend) if backend == "cpu" else deu_reference(xx, cc, dim)
        y.backward(gy.to(y.dtype))
        got.append((y, xx.grad, cc.grad))
    for a, e, what in zip(got[0], got[1], ("y", "grad_x", "grad_coeffs")):
        assert_close(a, e, torch.float32, f"deu {shape} {what}", scale_dim=0 if what == "grad_coeffs" else dim)
# The embedding forward and backward: every block width (D from 5 to 300), fp32 / fp16 / bf16, sum, mean, weighted.
for D in (5, 16, 37, 64, 128, 300):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.randn(50, D, generator=g).to(dtype)
        idx = torch.randint(0, 50, (70,), generator=g)
        off = torch.tensor([0, 3, 3, 20, 41, 69])
        psw = torch.rand(70, generator=g).to(dtype)
        for mode, p in (("sum", None), ("mean", None), ("sum", psw)):
            what = f"embedding D {D} {dtype} {mode} weighted {p is not None}"
            wk, wr = w.clone().requires_grad_(), w.double().requires_grad_()
            out = kfuse.embedding_bag(idx, wk, off, mode=mode, per_sample_weights=p, backend="cpu")
            ref = F.embedding_bag(idx, wr, off, mode=mode, per_sample_weights=None if p is None else p.double())
            assert_close(out, ref, dtype, what)
            go = torch.randn(out.shape, generator=g).to(dtype)
            out.backward(go)
            ref.backward(go.double())
            assert_close(wk.grad, wr.grad, dtype, what + " grad")
print("ok")
"""


def test_every_cpu_isa_entry_matches_the_reference() -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    ext = _backends.extension()
    assert ext is not None, "kfuse._C is not built"
    levels = ["base", "avx2", "avx512"]
    top = ext.cpu_isa()
    assert top in levels
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    for isa in levels[: levels.index(top) + 1]:
        env = dict(os.environ, KFUSE_CPU_ISA=isa)
        out = subprocess.run([sys.executable, "-c", _ISA_CHECK, tests_dir], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0, f"KFUSE_CPU_ISA={isa}:\n{out.stdout}\n{out.stderr[-3000:]}"
        assert out.stdout.split() == [isa, "ok"], out.stdout
