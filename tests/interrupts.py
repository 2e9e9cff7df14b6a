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


def interrupt_each_point(setup: Callable[[], T], op: Callable[[T], object],
                         check: Callable[[T, KeyboardInterrupt | None], None], limit: int = 50_000) -> int:
    """For k = 1, 2, ...: ``state = setup()``, then ``op(state)`` with a ``KeyboardInterrupt`` raised at its
    k-th interrupt point, then ``check(state, interrupt)`` (the one op raised, None when op returned: a run
    whose code caught it and completed); stops after the first run that completes before its k-th point.
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

        interrupted, grad = None, torch.is_grad_enabled()
        sys.setprofile(inject)
        try:
            op(state)
        except KeyboardInterrupt as e:
            interrupted = e
        finally:
            sys.setprofile(None)
            # torch's own context managers are interrupted too: torch.no_grad() stopped before its __exit__ had
            # restored grad mode left it off for the rest of the process (the tests that ran next).
            torch.set_grad_enabled(grad)
        check(state, interrupted)
        if seen < k:  # the run completed before its k-th point (one that swallowed the interrupt goes on)
            assert k > 1, "op reached no interrupt point"
            return k - 1
    raise AssertionError(f"op still interrupted after {limit} points")


class RaisesAfter:
    """``obj`` whose method ``name`` raises ``KeyboardInterrupt`` after it has returned, once (the interrupt
    pending as a C++ call returns, at one chosen point); every other attribute is ``obj``'s."""

    def __init__(self, obj: object, name: str) -> None:
        self._obj, self._name, self.fired = obj, name, False

    def __getattr__(self, attr: str) -> object:
        value = getattr(self._obj, attr)
        if attr != self._name or self.fired:
            return value

        def call(*args, **kwargs):
            value(*args, **kwargs)
            self.fired = True
            raise KeyboardInterrupt(f"after {attr}")

        return call


def raised_in(interrupt: BaseException | None, path: str) -> bool:
    """Whether ``interrupt`` was raised in code whose file path contains ``path`` (e.g. ``"torch/optim/"``)."""
    tb = None if interrupt is None else interrupt.__traceback__
    while tb is not None:
        if path in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
            return True
        tb = tb.tb_next
    return False
