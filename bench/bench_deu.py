"""pytest-benchmark over the DEU report cases: ``pytest bench/bench_deu.py --benchmark-only``.

The same cases, inputs and candidates as ``python -m kfuse`` (from ``kfuse.bench.deu``): every
kfuse backend (skipped, with the reason, where it cannot run) and the baselines (the eager
reference, ``torch.compile`` of it, ``torch.compile`` of ``deu_planned``), forward and
forward+backward. The device is CUDA when available, else CPU; on CPU the small (``--quick``)
cases run unless ``KFUSE_BENCH_FULL=1``.
Correctness is checked by the report and the tests; here the first call only warms up (and
compiles the ``torch.compile`` baselines) outside the timed region.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from kfuse.bench import deu, timed_call
from kfuse.report import Case, dtype_name

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = DEVICE.type == "cpu" and os.environ.get("KFUSE_BENCH_FULL") != "1"
CASES = deu.cases(DEVICE, QUICK)


def _case_id(case: Case) -> str:
    return f"{case.label.replace(' ', '_')}-{dtype_name(case.dtype)}-{case.mode}"


@pytest.mark.parametrize("name", [*deu.BACKENDS, "eager", "compile", "planned"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_deu(benchmark: Any, case: Case, name: str) -> None:
    """Time one candidate on one case (synchronising CUDA inside the timed call)."""
    prepared = timed_call(deu, case, name)
    if isinstance(prepared, str):
        pytest.skip(prepared)
    call, _ = prepared
    benchmark.group = f"deu {_case_id(case)}"
    nbytes = deu.bytes_moved(case)
    benchmark.extra_info["bytes"] = nbytes
    benchmark(call)
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9
