"""Hash of the compiled sources under ``csrc/``.

setup.py bakes it into ``kfuse._C`` at build time; at import, kfuse recomputes it from the
source tree (when one is present, as in an editable install) to detect a stale build. This
file imports nothing from kfuse or torch, so setup.py can load it before anything is built.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SUFFIXES = (".cpp", ".cu", ".h", ".cuh", ".txt")


def sources_hash(csrc: Path) -> str:
    """SHA-256 (first 16 hex digits) over the relative paths and contents of ``csrc``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in csrc.rglob("*") if p.is_file() and p.suffix in SUFFIXES):
        digest.update(path.relative_to(csrc).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
