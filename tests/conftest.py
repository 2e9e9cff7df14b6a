"""Shared test set-up: device markers and the Triton interpreter switch."""

from __future__ import annotations

import json
import math
import os
import zlib

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter on CPU tensors. This must be set
# before any Triton kernel is defined (triton.jit reads it at decoration time).
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch")
    on_gpu = pytest.mark.skip(
        reason="Triton-interpreter tests run on CPU-only machines; with a GPU the same kernels "
        "are tested compiled (the '-cuda' variants)"
    )
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(no_gpu)
        if "interpret" in item.keywords and HAS_CUDA:
            item.add_marker(on_gpu)


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A fresh, reproducible seed per test (derived from its id), applied to torch's RNG."""
    s = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(s)
    return s


@pytest.fixture
def backward_calls(monkeypatch: pytest.MonkeyPatch):
    """``calls = backward_calls(ops)`` counts, in ``calls["kernels"]`` and ``calls["reference"]``,
    the calls of an op module's kernel backward (``_backward_impl``) and reference backward
    (``_reference_vjp``) for the rest of the test."""
    def install(ops) -> dict[str, int]:
        calls = {"kernels": 0, "reference": 0}
        def counter(key: str, fn):
            def counted(*args, **kwargs):
                calls[key] += 1
                return fn(*args, **kwargs)
            return counted

        for key, attr in (("kernels", "_backward_impl"), ("reference", "_reference_vjp")):
            monkeypatch.setattr(ops, attr, counter(key, getattr(ops, attr)))
        return calls
    return install


@pytest.fixture
def report_rows(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture[str]):
    """``rows, ran, out = report_rows(op, bench_module, cases)`` runs ``python -m kfuse --quick
    --device cpu --ops <op>`` in-process with ``bench_module.cases`` replaced by ``cases`` (tiny
    shapes), asserts it completed with only ``op``'s rows and that every row that ran passed its
    check with a finite time, error and ratio, and returns the JSON rows, those that ran, and the
    printed tables."""
    def run(op: str, bench_module, cases) -> tuple[list[dict], list[dict], str]:
        from kfuse.__main__ import main  # noqa: PLC0415

        monkeypatch.setattr(bench_module, "cases", cases)
        assert main(["--quick", "--device", "cpu", "--ops", op, "--out", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["complete"] and report["cases_skipped"] == 0 and report["meta"]["ops"] == [op]
        rows = report["rows"]
        assert {r["op"] for r in rows} == {op}
        ran = [r for r in rows if r["status"] != "skipped"]
        assert all(r["status"] == "ok" and r["passed"] for r in ran), [r for r in ran if not r.get("passed")]
        for r in ran:
            assert math.isfinite(r["time_ms"]) and r["time_ms"] > 0, r
            assert math.isfinite(r["max_err"]) and r["max_err"] <= r["tol"], r
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["ratio_to"], r
        return rows, ran, out
    return run
