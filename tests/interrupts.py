"""An interrupt at each point of an operation, in turn.

Python raises a pending signal's exception (``KeyboardInterrupt`` from Ctrl-C, a signal handler's own) at
its next check: as a C function returns (before the caller has its value), as a Python function starts, at
a loop's jump. Between two calls that must go together (a C++ update and the count that records it), that
left state half-changed (process hunt, 2026-12-07: SIGALRM during a long C++ call). ``sys.setprofile``
sees the same places: a ``c_return``, a ``call`` or a ``return`` event, from which an exception raised
propagates as the interrupt would. :func:`interrupt_each_point` raises one at the k-th such event of a run,
for k = 1, 2, ... until a run completes, so a test checks the state after every interruption.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
_EVENTS = frozenset(("call", "return", "c_return"))


def interrupt_each_point(setup: Callable[[], T], op: Callable[[T], object], check: Callable[[T, bool], None],
                         limit: int = 50_000) -> int:
    """For k = 1, 2, ...: ``state = setup()``, then ``op(state)`` with a ``KeyboardInterrupt`` raised at its
    k-th interrupt point, then ``check(state, interrupted)``; stops after the first run that completes.
    Returns the number of points (> 0: a run that never reaches one checks nothing)."""
    for k in range(1, limit + 1):
        state = setup()
        seen = 0

        def inject(frame, event, arg, k=k):
            nonlocal seen
            if event in _EVENTS:
                seen += 1
                if seen == k:
                    sys.setprofile(None)
                    raise KeyboardInterrupt(f"interrupt point {k}")

        interrupted, grad = True, torch.is_grad_enabled()
        sys.setprofile(inject)
        try:
            op(state)
            interrupted = False
        except KeyboardInterrupt:
            pass
        finally:
            sys.setprofile(None)
            # torch's own context managers are interrupted too: torch.no_grad() stopped before its __exit__ had
            # restored grad mode left it off for the rest of the process (the tests that ran next).
            torch.set_grad_enabled(grad)
        check(state, interrupted)
        if not interrupted:
            assert k > 1, "op reached no interrupt point"
            return k - 1
    raise AssertionError(f"op still interrupted after {limit} points")
