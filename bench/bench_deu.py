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
from conftest import case_id

from kfuse.bench import deu
from kfuse.report import Case

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = DEVICE.type == "cpu" and os.environ.get("KFUSE_BENCH_FULL") != "1"
CASES = deu.cases(DEVICE, QUICK)


@pytest.mark.parametrize("name", [*deu.BACKENDS, "eager", "compile", "planned"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_deu(run_case: Any, case: Case, name: str) -> None:
    """Time one candidate on one case (synchronising CUDA inside the timed call)."""
    run_case("deu", deu, case, name)
