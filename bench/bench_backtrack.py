"""pytest-benchmark over the backtracking report cases: ``pytest bench/bench_backtrack.py --benchmark-only``.

The same cases, inputs and candidates as ``python -m kfuse --ops backtrack`` (from
``kfuse.bench.backtrack``): greedy decode of a ragged batch by kfuse's Llama on the paged cache against
``transformers``' ``generate``, and on the CPU the backtracking demo (``python -m kfuse.demos.backtrack``) as
rows: its four generators (kfuse, plain, reset, backtracking on ``DynamicCache``) on its trained model with its
classifier (the model is trained once per case, then kept for its candidates). The device is CUDA when
available, else CPU (the ``--quick`` cases unless ``KFUSE_BENCH_FULL=1``). Correctness is checked by
the report and the tests; here the first call only warms up.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from conftest import case_id

from kfuse.bench import backtrack
from kfuse.report import Case

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = DEVICE.type == "cpu" and os.environ.get("KFUSE_BENCH_FULL") != "1"
CASES = backtrack.cases(DEVICE, QUICK)
PARAMS = [(case, name) for case in CASES for name in backtrack.names(case)]


@pytest.mark.parametrize(("case", "name"), PARAMS, ids=[f"{case_id(c)}-{n}" for c, n in PARAMS])
def test_backtrack(run_case: Any, case: Case, name: str) -> None:
    """Time one candidate on one case (synchronising CUDA inside the timed call)."""
    run_case("backtrack", backtrack, case, name)
