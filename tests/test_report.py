"""The report driver (kfuse.report.run_report) on fake op benches: the order cases run in, a case whose
inputs cannot be built, and the timers' CPU paths. Each op family's own rows: tests/test_<op>.py."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kfuse import report as R

CPU = torch.device("cpu")


def _fake_op(name: str, n: int, fail_inputs: int | None = None) -> SimpleNamespace:
    """An op bench with ``n`` cases (shape (i,)); case ``fail_inputs`` cannot build its inputs."""
    def make_inputs(case: R.Case, seed: int) -> torch.Tensor:
        if case.shape[0] == fail_inputs:
            raise MemoryError("out of memory (simulated)")
        return torch.full((3,), float(case.shape[0]))

    return SimpleNamespace(
        cases=lambda device, quick: [R.Case(name, (i,), torch.float32, "fwd", device) for i in range(n)],
        make_inputs=make_inputs,
        candidates=lambda case, x: [R.Candidate("kfuse", "backend", lambda: x * 2),
                                    R.Candidate("eager", "baseline", lambda: x + x)],
        reference=lambda case, x: x.double() * 2,
        error=lambda case, got, want: float((got.double() - want).abs().max()),
        tolerance=lambda case: 0.0,
        bytes_moved=lambda case: 24,
        flops=lambda case: None,
    )


def test_cases_of_the_ops_take_turns_and_a_failed_case_is_a_row(monkeypatch) -> None:
    """Each op's first case runs before any op's second (a time budget cuts every op short, not the
    last ones whole), and a case whose inputs raise is one failed row, the report going on."""
    monkeypatch.setattr(R, "measure_ceilings", lambda device, quick: R.Ceilings(1 << 20, 10.0, "fake", 1.0))
    titles: list[str] = []
    ops = {"a": _fake_op("a", 3, fail_inputs=1), "b": _fake_op("b", 1), "c": _fake_op("c", 2)}
    rep = R.run_report(ops, CPU, quick=True, seed=0, progress=titles.append)
    started = [t.split(": ", 1)[1] for t in titles if t.startswith("case ")]
    assert started == ["a 0 fp32 fwd", "b 0 fp32 fwd", "c 0 fp32 fwd", "a 1 fp32 fwd",
                       "c 1 fp32 fwd", "a 2 fp32 fwd"]
    failed = [r for r in rep.rows if r.status == "failed"]
    assert [(r.op, r.shape, r.name) for r in failed] == [("a", "1", "*")]
    assert "MemoryError: out of memory (simulated)" in failed[0].note
    ok = [r for r in rep.rows if r.status == "ok"]
    assert len(ok) == 2 * 5 and all(r.passed and r.time_ms > 0 for r in ok) and rep.complete


def test_a_baseline_of_other_work_gets_its_own_rates(monkeypatch) -> None:
    """A candidate's ``work`` (flops, bytes) sets its rates; the others take the op's (LoRA's base GEMM got the
    LoRA op's, up to 35 % high: bench-math audit). The LoRA rows' GEMM work is 2·M·N·K and its three
    matrices."""
    from kfuse.bench import lora as L  # noqa: PLC0415

    monkeypatch.setattr(R, "measure_ceilings", lambda device, quick: R.Ceilings(1 << 20, 10.0, "fake", 1.0))
    op = _fake_op("a", 1)
    op.flops = lambda case: 1000
    op.candidates = lambda case, x: [R.Candidate("kfuse", "backend", lambda: x * 2),
                                     R.Candidate("base", "baseline", lambda: x * 2, work=(10, 6))]
    rows = {r.name: r for r in R.run_report({"a": op}, CPU, quick=True, seed=0, progress=lambda t: None).rows}
    for name, (flops, nbytes) in (("kfuse", (1000, 24)), ("base", (10, 6))):
        r = rows[name]
        assert abs(r.tflops * r.time_ms * 1e9 - flops) < 1e-6 * flops and abs(r.gbps * r.time_ms * 1e6 - nbytes) < 1e-6
    case = R.Case("lora", (64, 32, 48), torch.bfloat16, "bwd", CPU, {"r": 16})
    assert L.gemm_work(case) == (2 * 64 * 48 * 32, 2 * (64 * 32 + 48 * 32 + 64 * 48))


def test_cpu_timers() -> None:
    """``host_bound`` times as on the CPU anyway; there is no device time off CUDA."""
    calls = []
    ms, reps = R.time_ms(lambda: calls.append(1), CPU, quick=True, host_bound=True)
    assert ms >= 0 and reps == len(calls) >= 3
    assert R.device_time_us(lambda: None, CPU) is None


def test_host_bound_cuda_times_include_the_device_work(monkeypatch) -> None:
    """A host-bound call on CUDA whose device work outlasts its host work (a cuBLAS GEMM of ~10 us issued in
    ~5 us) is timed at the device's pace: rounds of back-to-back calls, each synchronised. Timed call by call
    with one synchronise at the end, it was its issuing alone (bench-math audit). A virtual clock and stream:
    each call takes 0.05 ms of host time and queues 0.5 ms of device work."""
    clock, device_free = [0.0], [0.0]

    def call() -> None:
        clock[0] += 0.05e-3
        device_free[0] = max(device_free[0], clock[0]) + 0.5e-3

    def sync(device) -> None:
        clock[0] = max(clock[0], device_free[0])

    monkeypatch.setattr(R, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(R, "_sync", sync)
    ms, reps = R.time_ms(call, torch.device("cuda"), host_bound=True)
    assert 0.5 <= ms <= 0.51 and reps % R.HOST_BOUND_CALLS == 0, (ms, reps)


def test_slow_cuda_calls_take_three_synchronised_runs(monkeypatch) -> None:
    """A call at least SLOW_CALL_MS long is timed by 3 synchronised wall-clock runs; a faster one is left
    to do_bench after one (CUDA's synchronize stubbed: the logic, not the device)."""
    import time  # noqa: PLC0415

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(R, "SLOW_CALL_MS", 5.0)
    calls = []
    ms, reps = R._time_slow_cuda(lambda: calls.append(time.sleep(0.006)), torch.device("cuda"))
    assert reps == 3 == len(calls) and ms >= 6.0
    assert R._time_slow_cuda(lambda: calls.append(None), torch.device("cuda")) is None and len(calls) == 4


def test_host_bound_cases_take_the_wall_clock_with_do_bench_beside(monkeypatch) -> None:
    """The embedding forward and the LoRA cases of M <= 512 are timed as host-bound on CUDA (back to back by
    the wall clock, host work included), and their other-cache column is do_bench's cold-L2 time: do_bench
    alone hid up to ~70 us of host time a call in the H200 figures (an audit of the harness). The logic with
    CUDA stubbed, not the device."""
    import contextlib  # noqa: PLC0415

    from kfuse.bench import embedding as E  # noqa: PLC0415
    from kfuse.bench import lora as L  # noqa: PLC0415

    cuda = torch.device("cuda")
    assert [(c.mode, c.shape[0]) for c in L.cases(cuda, False) if L.host_bound(c)] == [
        ("fwd", 128), ("multi", 128), ("bwd", 128), ("fwd", 1), ("bwd", 1)]
    assert [c.mode for c in E.cases(cuda, False) if E.host_bound(c)] == ["forward", "forward"]
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(R, "_triton_testing", lambda: SimpleNamespace(do_bench=lambda fn, **kw: 0.125))
    monkeypatch.setattr(R, "_time_cuda_events", lambda fn, device, budget: (0.5, 7))
    assert R.time_other_cache(lambda: None, cuda, host_bound=True) == ("cold", 0.125)
    assert R.time_other_cache(lambda: None, cuda) == ("warm", 0.5)
    # The forward's goal, a share of the copy ceiling with a cold L2, reads the cold column there.
    # (At FBGEMM's default shape: the issue sets no GPU targets for the medical one; bench-math audit.)
    medical, case = (next(c for c in E.cases(cuda, False) if c.mode == "forward" and c.params["shape"] == s)
                     for s in ("medical", "fbgemm"))
    row = R.Row("embedding", case.label, "fp32", "forward", "triton", "backend", "ok", time_ms=0.2, pct_copy=20.0,
                extra={"cold %copy": 70.0})
    R._set_goals(E, case, [row])
    assert row.goals["%copy"] == (60.0, 70.0) and E.target(case) == 1 / 3
    assert E.goals(medical) == {} and E.target(medical) is None


def test_device_time_is_the_median_call(monkeypatch) -> None:
    """``device us`` is the median of per-call device times (the profiler stubbed: the logic, not CUPTI):
    a call doing bookkeeping every 5th time (the KV rollback and fork rows) stays out, where the mean
    over the window of 20 calls took it in (bug hunt: 2 us calls read as 21.6)."""
    import torch.profiler  # noqa: PLC0415

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    calls = []

    class Profile:  # one session per call: the device time of the calls made inside it
        def __init__(self, activities):
            self.start = 0

        def __enter__(self):
            self.start = len(calls)
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return [SimpleNamespace(self_device_time_total=t) for t in calls[self.start:]]

    monkeypatch.setattr(torch.profiler, "profile", Profile)
    assert R.device_time_us(lambda: calls.append(100.0 if len(calls) % 5 == 4 else 2.0), torch.device("cuda")) == 2.0
    assert len(calls) == 20


def test_goals_and_the_other_cache_state(monkeypatch) -> None:
    """An op's ``goals`` reach its kfuse rows with the measured value (a speedup over the named
    baseline, or ``%copy``) and its own table column; ``both_caches`` adds the other cache state's
    GB/s and %copy (cold on the CPU: each timed call follows a flush of the last-level cache)."""
    monkeypatch.setattr(R, "measure_ceilings", lambda device, quick: R.Ceilings(1 << 20, 10.0, "fake", 1.0))
    flushes = []
    monkeypatch.setattr(R, "_last_level_cache_bytes", lambda: 1 << 16)
    real_empty = torch.empty

    def empty(*shape, **kw):  # the flush buffer: 2 × the last-level cache, as float32
        t = real_empty(*shape, **kw)
        flushes.append(t.numel())
        return t

    op = _fake_op("a", 1)
    op.goals = lambda case: {"eager": 1e9, "%copy": 0.0}
    op.both_caches = lambda case: True
    op.ratio_basis = lambda case, times, ceilings: (times["eager"], "eager")
    monkeypatch.setattr(torch, "empty", empty)
    rep = R.run_report({"a": op}, CPU, quick=True, seed=0, progress=lambda s: None)
    monkeypatch.setattr(torch, "empty", real_empty)
    kf, eager = rep.rows
    assert kf.goals["eager"] == (1e9, kf.speedup["eager"]) and kf.goals["%copy"] == (0.0, kf.pct_copy)
    assert eager.goals == {}
    assert kf.extra["cold GB/s"] > 0 and kf.extra["cold %copy"] == 100 * kf.extra["cold GB/s"] / 10.0
    assert 2 * (1 << 16) // 4 in flushes
    table = R.format_table(rep)
    assert "xeager >= 1e+09: " in table and "MISSED" in table and "%copy >= 0: " in table and "met" in table


def test_failed_cases_fail_the_run_and_the_json_is_strict(monkeypatch, tmp_path) -> None:
    """A case whose inputs could not be built checked nothing: a bad row (exit status 1), not counted
    as skipped (cases_skipped counts the time budget's rows only); an error of inf is written as the
    string "inf" (strict JSON: parsers refuse Infinity); a sub-second budget is printed as it is."""
    import json  # noqa: PLC0415

    monkeypatch.setattr(R, "measure_ceilings", lambda device, quick: R.Ceilings(1 << 20, 10.0, "fake", 1.0))
    nan_op = _fake_op("n", 1)
    nan_op.candidates = lambda case, x: [R.Candidate("kfuse", "backend", lambda: x * float("nan")),
                                         R.Candidate("eager", "baseline", lambda: x + x)]
    nan_op.error = lambda case, got, want: float("inf")
    rep = R.run_report({"a": _fake_op("a", 2, fail_inputs=0), "n": nan_op}, CPU, quick=True, seed=0,
                       json_path=tmp_path / "r.json", progress=lambda _: None)
    assert [r.bad for r in rep.rows if r.kind == "case"] == [True] and rep.cases_skipped == 0
    text = (tmp_path / "r.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    errs = [r["max_err"] for r in json.loads(text)["rows"] if r["op"] == "n" and r["name"] == "kfuse"]
    assert errs == ["inf"]
    late = R.run_report({"a": _fake_op("a", 3)}, CPU, quick=True, seed=0, time_budget=1e-9,
                        progress=lambda _: None)
    assert late.cases_skipped == 3 and all("time budget of 1e-09 s spent" in r.note for r in late.rows
                                           if r.kind == "case")


def test_cli_refuses_what_it_cannot_honour(tmp_path) -> None:
    """--time-budget nan (it turned the budget off), a seed torch cannot take, an --out that cannot be
    made or written (it failed at the first case's save): argparse errors up front, not a run that
    ignores them or a traceback."""
    import pytest  # noqa: PLC0415

    from kfuse.__main__ import main  # noqa: PLC0415

    blocker = tmp_path / "file"
    blocker.write_text("")
    for args in (["--time-budget", "nan"], ["--time-budget", "inf"], ["--seed", str(2**64)], ["--seed", "-1"],
                 ["--out", str(blocker / "sub")], ["--out", "/sys"]):  # /sys: no new files, even for root
        with pytest.raises(SystemExit) as e:
            main(["--quick", "--device", "cpu", "--ops", "deu", *args])
        assert e.value.code == 2, args
    # A folder where the report's JSON or chart goes failed after the run (files hunt, 2026-12-06).
    for name in ("report.json", "report.png"):
        out = tmp_path / f"out-{name}"
        (out / name).mkdir(parents=True)
        with pytest.raises(SystemExit) as e:
            main(["--quick", "--device", "cpu", "--ops", "deu", "--out", str(out)])
        assert e.value.code == 2, name


def test_json_is_strict_and_written_whole(tmp_path) -> None:
    """kfuse._files.write_json (the report's and the backtrack demo's JSON): non-finite floats as their names
    (the demo wrote Infinity, which JSON parsers refuse: files hunt), nested in dicts and lists; an object
    that cannot be written leaves the previous file as it was and no temporary file."""
    import json  # noqa: PLC0415

    import pytest  # noqa: PLC0415

    from kfuse._files import write_json  # noqa: PLC0415

    path = tmp_path / "x.json"
    write_json(path, {"a": [1.5, float("inf"), {"b": float("-inf")}], "c": (float("nan"), 2)})
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == {"a": [1.5, "inf", {"b": "-inf"}],
                                                                          "c": ["nan", 2]}
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text())["c"] == ["nan", 2] and sorted(p.name for p in tmp_path.iterdir()) == [
        "x.json"]
