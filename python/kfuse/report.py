"""The benchmark harness behind ``python -m kfuse``: ceilings, timing, rows, table, JSON and PNG.

An op takes part through a bench module (``kfuse.bench.<op>``, registered in
``kfuse.bench.OPS``) that follows :class:`OpBench`: it lists its cases, makes fresh random
inputs, offers candidates (its kfuse backends and the baselines a user would otherwise pick),
computes a float64 reference, measures the error with a per-dtype tolerance and states its
byte and FLOP formulas. Everything else is done here, the same way for every op:

- ceilings are measured on the device in the same run: a large copy (bytes read + written)
  and a large matmul (bf16 on CUDA, fp32 on CPU);
- each candidate runs once for the correctness check (this also warms it up and, for
  ``torch.compile`` baselines, compiles it outside the timed region), then is timed:
  ``triton.testing.do_bench`` (median) on CUDA when Triton is importable, else CUDA events
  (median); on CPU the median of repeated wall-clock timings, with torch's thread count as is;
- a candidate that cannot run is a ``skipped`` row with the reason, one that raises (a failed
  ``torch.compile`` included) a ``failed`` row with the error: the report never crashes on them.

Ops judged against one basis rather than by speedups (LoRA: the base GEMM ``x Wᵀ`` a fused layer
should cost barely more than) add a ``ratio_basis`` and a ``target`` (see :class:`OpBench`);
their rows get ``ratio`` (time / basis) and ``target``, and their own table, with TFLOP/s as %
of the matmul ceiling and any per-candidate measurements (``Candidate.extra``) as columns.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import itertools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from kfuse import _backends
from kfuse._files import write_json

#: What a candidate's run measures: the forward alone, or forward then backward.
MODES = ("fwd", "fwd+bwd")

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


@dataclass(frozen=True)
class Case:
    """One measured configuration of an op: shape, dtype, mode, device and op parameters."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    mode: str
    device: torch.device
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The shape and parameters, e.g. ``"8192x4096 dim=-1"``."""
        extra = "".join(f" {k}={v}" for k, v in self.params.items())
        return "x".join(map(str, self.shape)) + extra

    @property
    def numel(self) -> int:
        """Number of elements of ``shape``."""
        return math.prod(self.shape)


@dataclass
class Candidate:
    """A kfuse backend (``kind="backend"``) or a baseline (``kind="baseline"``) for one case.

    ``run`` does the measured work (see :func:`measured_call`) and returns what
    :meth:`OpBench.error` compares with the reference; it is None when ``skip`` says why the
    candidate cannot run here.
    """

    name: str
    kind: str
    run: Callable[[], Any] | None = None
    skip: str = ""
    #: Its own error measure (called with its result) instead of the op's ``error``: for a
    #: baseline that computes something else than the op (LoRA's base GEMM ``x Wᵀ``), checked
    #: against its own float64 result.
    error: Callable[[Any], float] | None = None
    #: Its own work, for its rates (TFLOP/s, GB/s, %mm, %copy), instead of the op's ``flops`` /
    #: ``bytes_moved``: for such a baseline (the base GEMM's 2·M·N·K and its three matrices; with the LoRA
    #: op's, its rates were up to 35 % high, a %mm above 100 on the CPU: bench-math audit).
    work: tuple[int | None, int | None] | None = None
    #: Measurements beside the time, called with the median time (ms) after timing: a dict of
    #: column name to number (LoRA: ``saved MiB`` for the backward, ``tok/s`` for a training step).
    extra: Callable[[float], dict[str, float]] | None = None
    #: A kfuse candidate that needs an optional library (``kfuse.integrations.peft``): when it is
    #: skipped, the case does not count as one that no kfuse backend ran (``python -m kfuse``).
    optional: bool = False
    #: Its calls are bound by host work (KV's metadata operations): timed on CUDA by the wall clock, as on
    #: the CPU: the median of rounds of back-to-back calls, each round synchronised (:func:`time_ms`),
    #: host checks included.
    #: do_bench's events would bracket only the device work and what of the host's outlasts the L2
    #: flush before each call (~70 us of memset on an H200). Its device time: :func:`device_time_us`.
    host_bound: bool = False


class OpBench(Protocol):
    """What an op's bench module provides (module-level names; see ``kfuse.bench.deu``).

    Optional, for ops judged against one basis (see ``kfuse.bench.lora``):
    ``ratio_basis(case, times, ceilings) -> (ms, label) | None``, the time every row of the case
    is divided by (``times``: each baseline's median ms), and ``target(case) -> float | None``,
    the ratio the kfuse backends aim for. ``bytes_moved`` may return None (no byte floor).

    Optional (see ``kfuse.bench.embedding``): ``goals(case) -> dict[str, float]``, more targets of
    the kfuse rows: a baseline's name for a speedup over it (``{"loop-sparse": 10.0}``: at least 10×
    faster) or ``"%copy"`` for a share of the copy ceiling; and ``both_caches(case) -> bool``: time
    each candidate also with the caches in the other state than its main time (:func:`time_other_cache`),
    as ``extra`` columns (``warm GB/s`` and ``warm %copy`` on CUDA, ``cold …`` on the CPU).

    Optional: ``host_bound(case) -> bool``: every candidate of the case is timed as
    :attr:`Candidate.host_bound` (calls whose host work may outlast their device work: an audit of the
    harness, 2026-12-05, found do_bench's flush hiding up to ~70 µs of host time a call in the H200
    figures of the embedding forward and the small-M LoRA rows; a memory-bound call was then slower with
    a warm L2 than with a cold one in 10 of 12 rows).
    """

    NAME: str

    def cases(self, device: torch.device, quick: bool) -> list[Case]:
        """The cases to run on ``device``; fewer and smaller ones when ``quick``."""

    def make_inputs(self, case: Case, seed: int) -> Any:
        """Fresh random inputs for ``case`` (requiring grad where ``case.mode`` needs it)."""

    def candidates(self, case: Case, inputs: Any) -> list[Candidate]:
        """Every kfuse backend (skipped ones with the reason) and every baseline."""

    def reference(self, case: Case, inputs: Any) -> Any:
        """The float64 reference result for ``inputs``, shaped like a candidate's result."""

    def error(self, case: Case, result: Any, expected: Any) -> float:
        """The error of a candidate's ``result`` against ``expected`` (the reference)."""

    def tolerance(self, case: Case) -> float:
        """The largest :meth:`error` that passes, for ``case.dtype`` and ``case.mode``."""

    def bytes_moved(self, case: Case) -> int | None:
        """Bytes a fused implementation must read and write: the floor for ``case``."""

    def flops(self, case: Case) -> int | None:
        """Floating-point operations of ``case``, or None where a FLOP rate means nothing."""


@dataclass
class Ceilings:
    """Device ceilings measured in this run."""

    copy_bytes: int
    copy_gbps: float
    matmul: str
    matmul_tflops: float


@dataclass
class Row:
    """One line of the report: a candidate on a case, with its time, rates and error."""

    op: str
    shape: str
    dtype: str
    mode: str
    name: str
    kind: str
    status: str
    note: str = ""
    time_ms: float | None = None
    reps: int | None = None
    first_call_ms: float | None = None
    speedup: dict[str, float] = field(default_factory=dict)
    gbps: float | None = None
    pct_copy: float | None = None
    floor_ratio: float | None = None
    tflops: float | None = None
    max_err: float | None = None
    tol: float | None = None
    passed: bool | None = None
    pct_matmul: float | None = None
    ratio: float | None = None
    ratio_to: str | None = None
    target: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    optional: bool = False
    #: The op's ``goals`` for a kfuse row: what each is measured against -> (aim, measured value).
    goals: dict[str, tuple[float, float | None]] = field(default_factory=dict)

    @property
    def bad(self) -> bool:
        """A kfuse backend that raised or missed its tolerance, or a case whose inputs or candidates
        could not be built (nothing of it was checked)."""
        return (self.kind == "backend" and (self.status == "failed" or self.passed is False)) or \
            (self.kind == "case" and self.status == "failed")


def dtype_name(dtype: torch.dtype) -> str:
    """Short dtype name for tables: ``fp32``, ``bf16``, ..."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


# --------------------------------------------------------------------------- helpers for ops


def measured_call(
    mode: str, fn: Callable[..., Tensor], args: Sequence[Any], wrt: Sequence[Tensor] = (),
    grad_out: Tensor | None = None,
) -> Callable[[], Any]:
    """The work a row times: ``fn(*args)`` (``"fwd"``), or that plus the gradients of the
    output with respect to ``wrt`` for ``grad_out`` (``"fwd+bwd"``, via ``torch.autograd.grad``
    so nothing accumulates between repetitions)."""
    if mode == "fwd":
        return lambda: fn(*args)
    if mode != "fwd+bwd":
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    wrt = tuple(wrt)
    return lambda: torch.autograd.grad(fn(*args), wrt, grad_out)


def backend_skips(reasons: dict[str, list[str]], device: torch.device) -> dict[str, str]:
    """Why the report skips each kfuse backend, from an op's ``backend_reasons`` (``""``: it
    runs). ``reference`` is left out (it is the eager baseline), and so is timing the Triton
    interpreter (``TRITON_INTERPRET=1`` on CPU runs one program at a time: a test tool)."""
    skips = {name: "; ".join(why) for name, why in reasons.items() if name != "reference"}
    if device.type == "cpu" and not skips.get("triton", "x") and _backends.triton_interpret():
        skips["triton"] = "TRITON_INTERPRET=1 runs Triton one program at a time; not timed"
    return skips


def _finite_pair(result: Tensor, expected: Tensor) -> tuple[Tensor, Tensor]:
    # Values the result's dtype cannot hold (fp16 overflow of a large gradient) are left out.
    ok = torch.isfinite(expected.to(result.dtype))
    return result.double()[ok], expected.double()[ok]


def scaled_error(result: Tensor, expected: Tensor) -> float:
    """``max |r − e| / max |e|``: the error relative to the tensor's scale (for gradients)."""
    r, e = _finite_pair(result, expected)
    if r.numel() == 0:
        return 0.0
    scale = e.abs().max().clamp(min=torch.finfo(torch.float64).tiny)
    return float(((r - e).abs().max() / scale).nan_to_num(math.inf))


# --------------------------------------------------------------------------- timing, ceilings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _triton_testing() -> Any | None:
    try:
        import triton.testing  # noqa: PLC0415 (optional)
    except ImportError:
        return None
    return triton.testing


def timer_name(device: torch.device) -> str:
    """How :func:`time_ms` times on ``device``."""
    if device.type == "cuda":
        timer = ("triton.testing.do_bench (median; L2 flushed before each call)" if _triton_testing()
                 else "CUDA events (median)")
        return (f"{timer}; calls of {SLOW_CALL_MS:.0f} ms or more: wall clock, median of 3 synchronised runs; "
                "host-bound cases (KV metadata, small-M LoRA, the embedding forward): wall clock, median of rounds "
                f"of {HOST_BOUND_CALLS} back-to-back calls, each round synchronised")
    return f"wall clock, median of repeats ({torch.get_num_threads()} threads)"


#: Host-bound calls on CUDA are timed in rounds of this many back-to-back calls (:func:`time_ms`).
HOST_BOUND_CALLS = 10

#: A CUDA call at least this slow (one warm, synchronised run, ms) is timed by 3 such runs, not by
#: do_bench: do_bench would run a ~1.5 s generate() 8 times (an estimate of 5 runs, a warm-up and one
#: timed run: a "median" of one).
SLOW_CALL_MS = 200.0


def time_ms(fn: Callable[[], Any], device: torch.device, quick: bool = False,
            host_bound: bool = False) -> tuple[float, int | None]:
    """Median time of ``fn()`` in milliseconds and the number of timed runs (None when
    ``do_bench`` chose it). ``fn`` should already have run once (the warm-up, compiles included).
    ``host_bound``: on CUDA too by the wall clock: the median over rounds of :data:`HOST_BOUND_CALLS`
    back-to-back calls, each round synchronised (see :attr:`Candidate.host_bound`)."""
    if device.type == "cuda" and not host_bound:
        with torch.cuda.device(device):
            slow = _time_slow_cuda(fn, device)
            if slow is not None:
                return slow
            testing = _triton_testing()
            if testing is not None:
                ms = testing.do_bench(fn, warmup=25, rep=40 if quick else 100, return_mode="median")
                return float(ms), None
            return _time_cuda_events(fn, device, 40.0 if quick else 100.0)
    budget, cap, min_reps, max_reps = (0.25, 1.0, 3, 50) if quick else (1.0, 3.0, 5, 200)
    # On CUDA, rounds of HOST_BOUND_CALLS back-to-back calls, each round synchronised at both ends: a call's
    # time is its round's over its calls, the device's work in it (timed call by call, a call was its issuing
    # alone: a cuBLAS GEMM of ~10 us on the device counted at its ~5 us launch; bench-math audit).
    calls = HOST_BOUND_CALLS if device.type == "cuda" else 1
    times: list[float] = []
    start = time.perf_counter()
    while True:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / calls)
        spent = time.perf_counter() - start
        if len(times) * calls >= max_reps or spent >= cap or (len(times) * calls >= min_reps and spent >= budget):
            break
    return statistics.median(times) * 1e3, len(times) * calls


def device_time_us(fn: Callable[[], Any], device: torch.device, calls: int = 20) -> float | None:
    """Device time of one ``fn()`` call in microseconds: the median over ``calls`` calls of each call's
    kernels' and copies' durations, recorded by ``torch.profiler`` (CUPTI), one profiling session per
    call. The median, as the rows' times: a case whose every n-th call does bookkeeping (the KV rollback
    row re-appends, the fork row frees its children) keeps it out; a mean over a window of calls took
    it in wherever the window happened to hold one (bug hunt). None off CUDA, or when the profiler
    failed or recorded no device activity (the row keeps its time)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    per_call = []
    try:
        for _ in range(calls):
            torch.cuda.synchronize(device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize(device)
            per_call.append(sum(e.self_device_time_total for e in prof.key_averages()))
    except Exception:  # noqa: BLE001 (no CUPTI, a changed profiler API: the column is left out)
        return None
    us = statistics.median(per_call)
    return us if us > 0 else None


def _last_level_cache_bytes() -> int:
    """The CPU's largest cache (Linux sysfs), or 64 MiB where it cannot be read."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KM")) * mult)
        except ValueError:
            continue
    return max(sizes, default=64 << 20)


def time_other_cache(fn: Callable[[], Any], device: torch.device, quick: bool = False,
                     host_bound: bool = False) -> tuple[str, float]:
    """``fn``'s median time (ms) with the caches in the other state than :func:`time_ms` leaves them:
    ``("warm", ms)`` on CUDA (``do_bench`` zeroes a 256 MiB buffer before each call, so its times are
    cold-L2 ones; here CUDA events around back-to-back calls), ``("cold", ms)`` on the CPU (its times
    are back-to-back, warm; here each call follows a write of twice the last-level cache). A
    ``host_bound`` call on CUDA, whose main time is back-to-back wall clock (warm), gets ``("cold", ms)``
    from ``do_bench`` (the device's view, cold L2)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            testing = _triton_testing() if host_bound else None
            if testing is not None:
                return "cold", float(testing.do_bench(fn, warmup=25, rep=40 if quick else 100,
                                                      return_mode="median"))
            return "warm", _time_cuda_events(fn, device, 40.0 if quick else 100.0)[0]
    flush = torch.empty(2 * _last_level_cache_bytes() // 4, dtype=torch.float32)
    budget, min_reps, max_reps = (0.25, 3, 20) if quick else (1.0, 5, 50)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget):
        flush.fill_(len(times))
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return "cold", statistics.median(times) * 1e3


def _time_slow_cuda(fn: Callable[[], Any], device: torch.device) -> tuple[float, int] | None:
    """One warm run, synchronised; for a call of at least SLOW_CALL_MS two more: their median and 3.
    None for a faster call (do_bench times it)."""
    times: list[float] = []
    while not times or (times[0] >= SLOW_CALL_MS and len(times) < 3):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return (statistics.median(times), len(times)) if times[0] >= SLOW_CALL_MS else None


def _time_cuda_events(fn: Callable[[], Any], device: torch.device, rep_ms: float) -> tuple[float, int]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    reps = max(5, min(1000, int(rep_ms / max((time.perf_counter() - t0) * 1e3, 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events), reps


def measure_ceilings(device: torch.device, quick: bool = False) -> Ceilings:
    """Copy bandwidth (bytes read + written) and matmul throughput of ``device``, measured now.

    CUDA: a 256 MiB copy and a bf16 8192³ matmul (4096³ with ``quick``). CPU: a 64 MiB copy
    (16 MiB) and an fp32 1024³ matmul (512³).
    """
    if device.type == "cuda":
        nbytes, m, mm_dtype = 256 << 20, (4096 if quick else 8192), torch.bfloat16
    else:
        nbytes, m, mm_dtype = (16 << 20) if quick else (64 << 20), (512 if quick else 1024), torch.float32
    copy_ms = _copy_ms(nbytes, device, quick)
    mm_ms = _matmul_ms(m, mm_dtype, device, quick)
    return Ceilings(
        copy_bytes=nbytes,
        copy_gbps=2 * nbytes / copy_ms / 1e6,
        matmul=f"{dtype_name(mm_dtype)} {m}x{m}x{m}",
        matmul_tflops=2 * m**3 / mm_ms / 1e9,
    )


def _copy_ms(nbytes: int, device: torch.device, quick: bool) -> float:
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    return time_ms(lambda: dst.copy_(src), device, quick)[0]


def _matmul_ms(m: int, dtype: torch.dtype, device: torch.device, quick: bool) -> float:
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    a @ b
    _sync(device)
    return time_ms(lambda: a @ b, device, quick)[0]


def device_name(device: torch.device) -> str:
    """A readable name for ``device`` (the GPU's name, or the CPU model and core count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


# --------------------------------------------------------------------------- running


class Progress:
    """Progress lines on stderr, each prefixed with the time since the start."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self.start

    def __call__(self, msg: str) -> None:
        print(f"[{self.elapsed:7.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Report:
    """Everything a run measured: metadata, ceilings and rows. ``complete``: the run reached its
    end (the JSON is rewritten after each case, so an interrupted run leaves ``False``);
    ``cases_skipped``: cases the time budget left out (rows of kind ``case``, status ``skipped``)."""

    meta: dict[str, Any]
    ceilings: Ceilings | None = None
    rows: list[Row] = field(default_factory=list)
    complete: bool = False

    @property
    def cases_skipped(self) -> int:
        return sum(r.kind == "case" and r.status == "skipped" for r in self.rows)  # the time budget's rows

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "meta": self.meta,
            "ceilings": dataclasses.asdict(self.ceilings) if self.ceilings else None,
            "complete": self.complete,
            "cases_skipped": self.cases_skipped,
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }

    def save_json(self, path: Path) -> None:
        """Write the report to ``path`` (atomically, so a killed run leaves a readable file; strict JSON: an
        error of inf, a backend that returned NaN, is written as the string "inf")."""
        write_json(path, self.to_json())


def _versions() -> dict[str, str]:
    import kfuse  # noqa: PLC0415

    triton = "not installed"
    try:
        import triton as _triton  # noqa: PLC0415

        triton = _triton.__version__
    except ImportError:
        pass
    optional = {}
    for dist in ("peft", "transformers"):  # the LoRA baselines' libraries (metadata only: no import)
        try:
            optional[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            optional[dist] = "not installed"
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton,
            "kfuse": kfuse.__version__, **optional}


def new_report(device: torch.device, quick: bool, seed: int, ops: Sequence[str]) -> Report:
    """An empty report with the run's metadata: device, versions, date and command."""
    return Report(meta={
        "device": device_name(device),
        "device_type": device.type,
        "versions": _versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(getattr(sys, "orig_argv", sys.argv)),
        "ops": list(ops),
        "quick": quick,
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "timer": timer_name(device),
        "columns": {
            "speedup": "baseline time / this time",
            "gbps": "op bytes (its bench module's formula) / time",
            "pct_copy": "gbps as % of the copy ceiling measured in this run",
            "floor_ratio": "time / (op bytes / copy ceiling); 1.0 = at the measured floor",
            "max_err": "vs the float64 reference on the same inputs; formula per op (bench module)",
            "pct_matmul": "tflops as % of the matmul ceiling measured in this run",
            "ratio": "time / the case's basis (ratio_to: the base GEMM for LoRA); ops with a ratio_basis only",
            "target": "the ratio the kfuse backends aim for (kfuse rows; not a pass/fail check)",
            "extra": "per-candidate measurements beside the time (LoRA: saved MiB, tok/s)",
        },
    })


def _note_row(case: Case, name: str, kind: str, status: str, note: str, optional: bool = False) -> Row:
    return Row(case.op, case.label, dtype_name(case.dtype), case.mode, name, kind, status, note, optional=optional)


def _title(case: Case) -> str:
    return f"{case.op} {case.label} {dtype_name(case.dtype)} {case.mode}"


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError:  # a kernel's fault leaves the context unusable: the next case fails on its own
            pass


def run_case(op: OpBench, case: Case, seed: int, ceilings: Ceilings, quick: bool,
             progress: Callable[[str], None]) -> list[Row]:
    """Check and time every candidate of ``case``; returns its rows, speedups filled in. A case whose
    inputs or candidates cannot be built is one failed row (the report goes on to the next case)."""
    torch._dynamo.reset()  # each case compiles its own baselines (no recompile limit, no reuse)
    try:
        inputs = op.make_inputs(case, seed)
        cands = list(op.candidates(case, inputs))
    except Exception as exc:  # noqa: BLE001 (an out-of-memory, a missing library: a row, not a crash)
        msg = f"inputs or candidates failed: {type(exc).__name__}: {exc}".strip()
        progress(f"{_title(case)}: FAILED: {msg.splitlines()[0][:200]}")
        _release(case.device)
        return [_note_row(case, "*", "case", "failed", msg)]
    try:
        expected = op.reference(case, inputs)
        ref_error = ""
    except Exception as err:  # noqa: BLE001 (recorded in every row)
        expected, ref_error = None, f"float64 reference failed: {type(err).__name__}: {err}"
    tol = op.tolerance(case)
    title = _title(case)
    rows: list[Row] = []
    for cand in cands:
        if cand.skip or cand.run is None:
            rows.append(_note_row(case, cand.name, cand.kind, "skipped", cand.skip, cand.optional))
            progress(f"{title}: {cand.name} skipped: {cand.skip}")
            continue
        if ref_error:
            rows.append(_note_row(case, cand.name, cand.kind, "failed", ref_error))
            continue
        try:
            t0 = time.perf_counter()
            result = cand.run()
            _sync(case.device)
            first_ms = (time.perf_counter() - t0) * 1e3
            err = cand.error(result) if cand.error is not None else op.error(case, result, expected)
            del result
            host_bound = cand.host_bound or getattr(op, "host_bound", lambda c: False)(case)
            ms, reps = time_ms(cand.run, case.device, quick, host_bound)
            extra = cand.extra(ms) if cand.extra is not None else {}
            flops, nbytes = cand.work if cand.work is not None else (op.flops(case), op.bytes_moved(case))
            if nbytes and getattr(op, "both_caches", lambda c: False)(case):
                state, other_ms = time_other_cache(cand.run, case.device, quick, host_bound)
                extra[f"{state} GB/s"] = nbytes / other_ms / 1e6
                extra[f"{state} %copy"] = 100 * extra[f"{state} GB/s"] / ceilings.copy_gbps
        except Exception as exc:  # noqa: BLE001 (a failing candidate is a row, not a crash)
            msg = f"{type(exc).__name__}: {exc}".strip()
            rows.append(_note_row(case, cand.name, cand.kind, "failed", msg))
            progress(f"{title}: {cand.name} FAILED: {msg.splitlines()[0][:200]}")
            _release(case.device)
            continue
        row = Row(case.op, case.label, dtype_name(case.dtype), case.mode, cand.name, cand.kind, "ok",
                  time_ms=ms, reps=reps, first_call_ms=first_ms, max_err=err, tol=tol, passed=err <= tol,
                  extra=extra, optional=cand.optional)
        if nbytes:
            row.gbps = nbytes / ms / 1e6
            row.pct_copy = 100 * row.gbps / ceilings.copy_gbps
            row.floor_ratio = ms / (nbytes / ceilings.copy_gbps / 1e6)
        if flops is not None:
            row.tflops = flops / ms / 1e9
            row.pct_matmul = 100 * row.tflops / ceilings.matmul_tflops
        rows.append(row)
        progress(f"{title}: {cand.name} {ms:.3f} ms, err {err:.1e} {'ok' if row.passed else 'FAIL'}")
    base = {r.name: r.time_ms for r in rows if r.kind == "baseline" and r.time_ms}
    for r in rows:
        if r.time_ms:
            r.speedup = {name: t / r.time_ms for name, t in base.items()}
    _set_ratios(op, case, rows, base, ceilings)
    _set_goals(op, case, rows)
    del inputs, expected
    _release(case.device)
    return rows


def _set_ratios(op: OpBench, case: Case, rows: list[Row], base: dict[str, float], ceilings: Ceilings) -> None:
    """``ratio``/``ratio_to`` of every timed row and ``target`` of the kfuse rows, for an op with
    a ``ratio_basis`` (a basis whose baseline did not run leaves them None)."""
    basis = getattr(op, "ratio_basis", None)
    got = basis(case, base, ceilings) if basis is not None else None
    if not got:
        return
    basis_ms, label = got
    target = getattr(op, "target", None)
    goal = target(case) if target is not None else None
    for r in rows:
        if r.time_ms:
            r.ratio, r.ratio_to = r.time_ms / basis_ms, label
            r.target = goal if r.kind == "backend" else None


def _set_goals(op: OpBench, case: Case, rows: list[Row]) -> None:
    """``goals`` of the timed kfuse rows: each of the op's goals with the row's measured value (its
    speedup over the named baseline, or its ``%copy``; None where that baseline did not run). ``%copy``
    is the cold-cache one where the row has it beside a warm main time (a host-bound CUDA case: the
    embedding forward's goal is a share of the copy ceiling with a cold L2)."""
    goals = getattr(op, "goals", lambda c: {})(case)
    cold = case.device.type == "cuda" and getattr(op, "host_bound", lambda c: False)(case)
    for r in rows:
        if r.kind == "backend" and r.time_ms:
            copy = r.extra.get("cold %copy", r.pct_copy) if cold else r.pct_copy
            r.goals = {k: (aim, copy if k == "%copy" else r.speedup.get(k)) for k, aim in goals.items()}


def run_report(ops: dict[str, OpBench], device: torch.device, quick: bool, seed: int,
               json_path: Path | None = None, time_budget: float | None = None,
               progress: Callable[[str], None] | None = None) -> Report:
    """Measure the ceilings, then run every case of every op in ``ops`` on ``device``.

    The JSON at ``json_path`` is rewritten after each case, so an interrupted run still leaves
    its results. Cases that would start after ``time_budget`` seconds are recorded as skipped.
    """
    progress = progress or Progress()
    start = time.perf_counter()
    report = new_report(device, quick, seed, list(ops))
    progress(f"device: {report.meta['device']}; measuring the copy and matmul ceilings")
    report.ceilings = ceil = measure_ceilings(device, quick)
    progress(f"ceilings: copy {ceil.copy_gbps:.1f} GB/s (read + written), matmul {ceil.matmul} "
             f"{ceil.matmul_tflops:.2f} TFLOP/s")
    # The families' cases in turn (each lists its targets' cases first), so a time budget that cuts the
    # run short leaves every family its first cases rather than one family all of its own.
    per_op = [[(op, case) for case in op.cases(device, quick)] for op in ops.values()]
    all_cases = [pair for turn in itertools.zip_longest(*per_op) for pair in turn if pair is not None]
    for i, (op, case) in enumerate(all_cases):
        if time_budget is not None and time.perf_counter() - start > time_budget:
            note = f"time budget of {time_budget:g} s spent"
            report.rows.append(_note_row(case, "*", "case", "skipped", note))
            continue
        progress(f"case {i + 1}/{len(all_cases)}: {_title(case)}")
        report.rows.extend(run_case(op, case, seed + i, ceil, quick, progress))
        if json_path is not None:
            report.save_json(json_path)
    report.complete = True
    if json_path is not None:
        report.save_json(json_path)
    return report


# --------------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _render(head: list[str], body: list[list[str]], n_fixed: int = 5) -> list[str]:
    """Aligned lines: the first ``n_fixed`` columns left-aligned, the rest right-aligned; a body row
    shorter than ``head`` (skipped/failed) prints its last cell after the fixed columns."""
    widths = [max([len(head[i]), *(len(b[i]) for b in body if i < n_fixed or len(b) == len(head))])
              for i in range(len(head))]

    def line(cells: list[str]) -> str:
        if len(cells) != len(head):  # a skipped/failed row: the message after the fixed columns
            fixed = zip(cells[:n_fixed], widths[:n_fixed], strict=True)
            return "  ".join(c.ljust(w) for c, w in fixed) + "  " + cells[-1]
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i < n_fixed else c.rjust(w) for i, (c, w) in pairs)

    return [line(head), line(["-" * w for w in widths]), *map(line, body)]


def _fixed_cells(r: Row) -> list[str]:
    return [r.op, r.shape, r.dtype, r.mode, r.name if r.kind != "baseline" else f"({r.name})"]


def _note_cells(r: Row) -> list[str]:
    return [*_fixed_cells(r), f"{r.status}: {r.note.splitlines()[0] if r.note else ''}"[:160]]


def _check_cell(r: Row) -> str:
    return "ok" if r.passed else f"FAIL (tol {r.tol:.0e})"


def _speedup_table(rows: list[Row]) -> list[str]:
    """Speedups vs every baseline, GB/s and the floor (DEU: an elementwise, memory-bound op)."""
    baselines = list(dict.fromkeys(r.name for r in rows if r.kind == "baseline" and r.status == "ok"))
    with_flops = any(r.tflops is not None for r in rows)
    head = ["op", "shape", "dtype", "mode", "backend", "time ms", *[f"x{b}" for b in baselines],
            "GB/s", "%copy", "floor x", *(["TFLOP/s"] if with_flops else []), "max err", "check"]
    return _render(head, _body(rows, lambda r: [
        *_fixed_cells(r), _fmt(r.time_ms, ".4g"), *[_fmt(r.speedup.get(b), ".2f") for b in baselines],
        _fmt(r.gbps, ".4g"), _fmt(r.pct_copy, ".3g"), _fmt(r.floor_ratio, ".3g"),
        *([_fmt(r.tflops, ".4g")] if with_flops else []), _fmt(r.max_err, ".1e"), _check_cell(r),
    ]))


def _body(rows: list[Row], cells: Callable[[Row], list[str]]) -> list[list[str]]:
    """A table's rows: ``cells(r)`` for measured rows, the note of skipped or failed ones."""
    return [cells(r) if r.status == "ok" else _note_cells(r) for r in rows]


def _target_cell(r: Row) -> str:
    if r.target is None:
        return "-"
    return f"<={r.target:.2f} {'met' if r.ratio is not None and r.ratio <= r.target else 'MISSED'}"


def _goals_cell(r: Row) -> str:
    """``x loop-sparse >= 10: 12.1 met; %copy >= 60: 41.2 MISSED``: the row's other targets."""
    cells = []
    for k, (aim, got) in r.goals.items():
        name = k if k == "%copy" else f"x{k}"
        verdict = "not run" if got is None else f"{got:.3g} {'met' if got >= aim else 'MISSED'}"
        cells.append(f"{name} >= {aim:g}: {verdict}")
    return "; ".join(cells) or "-"


def _ratio_table(rows: list[Row]) -> list[str]:
    """Time / the case's basis beside the target, TFLOP/s and % of the matmul ceiling, GB/s and % of
    the copy ceiling, and each ``extra`` measurement (LoRA: a GEMM-bound op judged against the GEMM
    it adds to), and the op's other goals where it has them."""
    extras = list(dict.fromkeys(k for r in rows for k in r.extra))
    goals = any(r.goals for r in rows)
    head = ["op", "shape", "dtype", "mode", "backend", "time ms", "ratio", "vs", "target",
            *(["goals"] if goals else []), "TFLOP/s", "%mm", "GB/s", "%copy", *extras, "max err", "check"]
    return _render(head, _body(rows, lambda r: [
        *_fixed_cells(r), _fmt(r.time_ms, ".4g"), _fmt(r.ratio, ".3f"), r.ratio_to or "-", _target_cell(r),
        *([_goals_cell(r)] if goals else []),
        _fmt(r.tflops, ".4g"), _fmt(r.pct_matmul, ".3g"), _fmt(r.gbps, ".4g"), _fmt(r.pct_copy, ".3g"),
        *[_fmt(r.extra.get(k), ".4g") for k in extras],
        _fmt(r.max_err, ".1e"), _check_cell(r),
    ]))


def format_table(report: Report) -> str:
    """The report as plain-text tables, one per op, with the device and ceilings on top."""
    groups: dict[str, list[Row]] = {}
    for r in report.rows:
        groups.setdefault(r.op, []).append(r)
    ratio_ops = {op for op, rows in groups.items() if any(r.ratio is not None for r in rows)}
    meta, ceil = report.meta, report.ceilings
    top = [f"kfuse report: {meta['device']}; torch {meta['versions']['torch']}, triton "
           f"{meta['versions']['triton']}, kfuse {meta['versions']['kfuse']}; {meta['date']}"]
    if ceil:
        top.append(f"ceilings: copy {ceil.copy_gbps:.1f} GB/s (read + written, {ceil.copy_bytes >> 20} MiB), "
                   f"matmul {ceil.matmul} {ceil.matmul_tflops:.2f} TFLOP/s; timer: {meta['timer']}")
    load, cores = meta.get("load_avg_1min"), meta.get("cpu_count")
    if meta["device_type"] == "cpu" and load is not None and cores and load > cores:
        top.append(f"WARNING: the machine was busy (load average {load:.1f} on {cores} cores at the "
                   "start): CPU timings are unreliable")
    top.append("(name) = baseline; xB = speedup vs baseline B; floor x = time / (bytes / copy ceiling)")
    if ratio_ops:
        top.append("ratio = time / the basis named in vs (its baseline's time, measured in this run); target = "
                   "what the kfuse rows aim for; %mm = TFLOP/s as % of the matmul ceiling")
    tables = [_ratio_table(rows) if op in ratio_ops else _speedup_table(rows) for op, rows in groups.items()]
    return "\n".join(top) + "\n" + "\n\n".join("\n".join(t) for t in tables or [_speedup_table([])])


def save_png(report: Report, path: Path) -> str | None:
    """Bar chart of each backend's speedup vs each baseline, per case. Returns None, or why no
    PNG was written (matplotlib missing, nothing to plot)."""
    try:
        import matplotlib  # noqa: PLC0415 (optional, slow to import)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "matplotlib is not installed: no PNG written"
    bars = [r for r in report.rows if r.kind == "backend" and r.speedup]
    if not bars:
        return "no backend row has a speedup to plot: no PNG written"
    baselines = sorted({b for r in bars for b in r.speedup})
    width = 0.8 / len(baselines)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(bars) + 2), 6.5))
    for j, b in enumerate(baselines):
        xs = [i + (j - (len(baselines) - 1) / 2) * width for i in range(len(bars))]
        ys = [r.speedup.get(b, float("nan")) for r in bars]
        container = ax.bar(xs, ys, width, label=f"vs {b}")
        ax.bar_label(container, fmt="%.1f", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speedup (baseline time / kfuse time)")
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([f"{r.op} {r.shape} {r.dtype} {r.mode} {r.name}" for r in bars], fontsize=7,
                       rotation=55, ha="right", rotation_mode="anchor")
    ax.set_title(f"kfuse on {report.meta['device']} ({report.meta['date']})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
