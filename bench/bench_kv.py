"""pytest-benchmark over the KV report cases: ``pytest bench/bench_kv.py --benchmark-only``.

The same cases, inputs and candidates as ``python -m kfuse --ops kv`` (from ``kfuse.bench.kv``):
rollback of 256 sequences (``cache.rollback``, metadata only), fork, append of one token per sequence
(``append`` + ``advance``) against ``torch.cat`` onto a contiguous cache, decode attention (uniform
and ragged lengths) and prefill attention (the kfuse backends, skipped with the reason where they
cannot run) against ``scaled_dot_product_attention`` on contiguous K/V. What each row times is in
``kfuse.bench.kv``'s docstring. The device is CUDA when available, else CPU; on CPU the small
(``--quick``) cases run unless ``KFUSE_BENCH_FULL=1``. Correctness is checked by the report and the
tests; here the first call only warms up (for rollback it is the first rollback; each timed call then
frees one page per sequence, see ``kfuse.bench.kv``).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from conftest import case_id

from kfuse.bench import kv
from kfuse.report import Case

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = DEVICE.type == "cpu" and os.environ.get("KFUSE_BENCH_FULL") != "1"
CASES = kv.cases(DEVICE, QUICK)
PARAMS = [(case, name) for case in CASES for name in kv.names(case)]


@pytest.mark.parametrize(("case", "name"), PARAMS, ids=[f"{case_id(c)}-{n}" for c, n in PARAMS])
def test_kv(run_case: Any, case: Case, name: str) -> None:
    """Time one candidate on one case (synchronising CUDA inside the timed call)."""
    run_case("kv", kv, case, name)
