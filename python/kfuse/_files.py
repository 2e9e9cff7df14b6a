"""Files written whole or not at all, shared by the data and model writers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def replaced(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode, **kwargs)`` for writing, into a temporary file beside ``path`` that replaces it
    only when the block ends without an error: a writer failing part-way (bad input found late, a full
    disk, an interrupt) left a truncated file where a good one had been (state-after-errors hunt,
    2026-12-05). The temporary file is removed on error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
