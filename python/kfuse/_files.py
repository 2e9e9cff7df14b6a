"""Files written whole or not at all, shared by the data, model, report and demo writers."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def replaced(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode, **kwargs)`` for writing, into a temporary file beside ``path`` that replaces it
    only when the block ends without an error: a writer failing part-way (bad input found late, a full
    disk, an interrupt) left a truncated file where a good one had been (state-after-errors hunt,
    2026-12-05). As ``open`` would: a symlink's target is written, an existing file keeps its permission
    bits (a new one gets the umask's), and a missing folder is named. The temporary file has a name of its
    own per call (concurrent writers of one path do not share it) and is removed on error."""
    path = Path(os.path.realpath(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: no folder {path.parent}")
    try:
        bits: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        bits = None  # a new file: the exclusive open below applies the umask, as open() would
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), **kwargs) as f:
            yield f
        if bits is not None:
            os.chmod(tmp, bits)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as strict JSON at ``path``, through :func:`replaced`: every non-finite float is written as its
    name (``"inf"``, ``"-inf"``, ``"nan"``), not as ``Infinity``/``NaN``, which JSON parsers refuse (the
    report's inf errors, the backtrack demo's ``computed_per_kept`` when nothing was kept: files hunt)."""
    with replaced(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(_finite(obj), indent=1, allow_nan=False))


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v
