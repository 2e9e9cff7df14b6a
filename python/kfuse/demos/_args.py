"""Argument checks shared by the demos and examples: values that would otherwise be replaced by a
default, fail deep in a run, or fail after it (an output folder that does not exist) are argparse
errors up front."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


def positive(kind: type) -> Callable[[str], float]:
    """An argparse ``type``: a ``kind`` (int or float) > 0 (finite)."""
    def parse(text: str):
        v = kind(text)
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be > 0; got {text}")
        return v
    return parse


def count(text: str) -> int:
    """An argparse ``type``: an int >= 0."""
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {text}")
    return v


def fraction(text: str) -> float:
    """An argparse ``type``: a float in [0, 1)."""
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1); got {text}")
    return v


def check_outputs(parser: argparse.ArgumentParser, **paths: str | None) -> None:
    """``parser.error`` for an output path (option name -> path or None) whose folder does not exist."""
    for name, path in paths.items():
        if path is not None and not Path(path).resolve().parent.is_dir():
            parser.error(f"--{name.replace('_', '-')}: the folder of {path} does not exist")
