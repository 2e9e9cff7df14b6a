"""pytest-benchmark over the embedding report cases: ``pytest bench/bench_embedding.py --benchmark-only``.

The same cases, inputs and candidates as ``python -m kfuse --ops embedding`` (from
``kfuse.bench.embedding``): the medical shape (3 tables of 74k/79k/20k rows, D 128, ~20 Zipf codes
per bag) and, on CUDA, FBGEMM's default (32 × 100k, B 512); forward, and a training step with
row-wise Adagrad (kfuse's fused optimizer) against the per-table ``nn.EmbeddingBag`` loop (dense +
Adagrad, sparse + SparseAdam), ``torch.compile`` of it and FBGEMM's CPU op. The device is CUDA when
available, else CPU; on CPU the small (``--quick``, B 1024) cases run unless ``KFUSE_BENCH_FULL=1``.
Correctness is checked by the report and the tests; here the first call only warms up.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from conftest import case_id

from kfuse.bench import embedding
from kfuse.report import Case

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = DEVICE.type == "cpu" and os.environ.get("KFUSE_BENCH_FULL") != "1"
CASES = embedding.cases(DEVICE, QUICK)
PARAMS = [(case, name) for case in CASES for name in embedding.names(case)]


@pytest.mark.parametrize(("case", "name"), PARAMS, ids=[f"{case_id(c)}-{n}" for c, n in PARAMS])
def test_embedding(run_case: Any, case: Case, name: str) -> None:
    """Time one candidate on one case (synchronising CUDA inside the timed call)."""
    run_case("embedding", embedding, case, name)
