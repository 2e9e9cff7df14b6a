"""Shared set-up of the pytest-benchmark files (``bench/bench_<op>.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kfuse.bench import timed_call
from kfuse.report import Case, OpBench, dtype_name


def case_id(case: Case) -> str:
    """A case's test id: ``<mode>-<shape and params>-<dtype>``."""
    return f"{case.mode}-{case.label.replace(' ', '_')}-{dtype_name(case.dtype)}"


@pytest.fixture
def run_case(benchmark: Any) -> Callable[[str, OpBench, Case, str], tuple[float | None, Any]]:
    """``median, inputs = run_case(op_name, op, case, name)`` times candidate ``name`` of ``op`` on
    ``case`` (skipped with the reason where it cannot run), records the op's bytes and FLOPs and
    the GB/s and TFLOP/s they give, and returns the median time (s; None without stats) and the
    inputs, for an op's own extras."""
    def run(op_name: str, op: OpBench, case: Case, name: str) -> tuple[float | None, Any]:
        prepared = timed_call(op, case, name)
        if isinstance(prepared, str):
            pytest.skip(prepared)
        call, inputs = prepared
        benchmark.group = f"{op_name} {case_id(case)}"
        nbytes, flops = op.bytes_moved(case), op.flops(case)
        benchmark.extra_info.update({"bytes": nbytes, "flops": flops})
        benchmark(call)
        if benchmark.stats is None:
            return None, inputs
        median = benchmark.stats.stats.median
        if nbytes:
            benchmark.extra_info["GB/s"] = nbytes / median / 1e9
        if flops:
            benchmark.extra_info["TFLOP/s"] = flops / median / 1e12
        return median, inputs
    return run
