"""Bench modules: one per op family, used by ``python -m kfuse`` and by ``bench/bench_<op>.py``.

Each module follows :class:`kfuse.report.OpBench` (cases, inputs, candidates, float64
reference, error and tolerance, byte and FLOP formulas). Adding an op adds its module here
and one line to :data:`OPS`.
"""

from kfuse.bench import deu
from kfuse.report import OpBench

#: The ops the report knows, by the name ``--ops`` takes.
OPS: dict[str, OpBench] = {"deu": deu}

__all__ = ["OPS"]
