"""Argument checks shared by the demos and examples: values that would otherwise be replaced by a
default, fail deep in a run, or fail after it (an output folder that does not exist) are argparse
errors up front."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def positive(kind: type) -> Callable[[str], float]:
    """An argparse ``type``: a ``kind`` (int or float) > 0 (finite)."""
    def parse(text: str) -> float:
        v = kind(text)
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be > 0; got {text}")
        return v
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'abc'"
    return parse


def threads(text: str) -> int:
    """An argparse ``type``: a thread count for ``torch.set_num_threads``, an int in [1, 1024] (2**31 and up
    failed there with a traceback, 100000 in OpenMP's team with "Out of memory": files hunt, review)."""
    v = int(text)
    if not 1 <= v <= 1024:
        raise argparse.ArgumentTypeError(f"must be in [1, 1024]; got {text}")
    return v


def count(text: str) -> int:
    """An argparse ``type``: an int >= 0."""
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {text}")
    return v


def rng_seed(text: str) -> int:
    """An argparse ``type``: an int in [0, 2**63) (what torch's and numpy's generators all take)."""
    v = int(text)
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63); got {text}")
    return v


def fraction(text: str) -> float:
    """An argparse ``type``: a float in [0, 1)."""
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1); got {text}")
    return v


def unwritable(folder: Path) -> str | None:
    """Why files cannot be written in ``folder`` (an existing folder), or None: a file is created and
    removed there (permission bits say nothing to root, nor about read-only file systems)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as err:
        return err.strerror or str(err)


def check_outputs(parser: argparse.ArgumentParser, **paths: str | None) -> None:
    """``parser.error`` for an output path (option name -> path or None) whose folder does not exist or
    cannot be written, or that is a folder or an unwritable file (they failed after the run; bug hunt)."""
    for name, path in paths.items():
        if path is None:
            continue
        option, folder = f"--{name.replace('_', '-')}", Path(path).resolve().parent
        if not folder.is_dir():
            parser.error(f"{option}: the folder of {path} does not exist")
        if Path(path).is_dir():
            parser.error(f"{option}: {path} is a folder; give a file name")
        why = unwritable(folder) or (None if not Path(path).exists() or os.access(path, os.W_OK)
                                     else "the file is not writable")
        if why:
            parser.error(f"{option}: cannot write {path}: {why}")


def check_figures(parser: argparse.ArgumentParser, **paths: str | None) -> None:
    """:func:`check_outputs` of what matplotlib writes (a name without an extension gets ``.png``, its
    default: a folder ``fig.png`` beside ``--out fig`` failed after the run; files hunt), and
    ``parser.error`` for a file type matplotlib cannot write."""
    check_outputs(parser, **paths)
    check_outputs(parser, **{name: figure_path(path) for name, path in paths.items() if figure_path(path) != path})
    try:
        from matplotlib.backend_bases import FigureCanvasBase  # noqa: PLC0415 (a demo dependency)
    except ImportError:
        return  # the demo says so when it draws
    kinds = FigureCanvasBase.get_supported_filetypes()
    for name, path in paths.items():
        ext = Path(path).suffix[1:].lower() if path is not None else ""
        if ext and ext not in kinds:
            parser.error(f"--{name.replace('_', '-')}: matplotlib cannot write .{ext} files; use one of "
                         f"{', '.join(sorted(kinds))}")


def figure_path(path: str | None) -> str | None:
    """The file matplotlib's ``savefig(path)`` writes: ``path``, or ``path + ".png"`` without an extension."""
    return path if path is None or Path(path).suffix else path + ".png"


def check_device(parser: argparse.ArgumentParser, name: str, device: str | None) -> None:
    """``parser.error`` for ``--{name} cuda`` where torch sees no CUDA device."""
    import torch  # noqa: PLC0415

    if device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--{name} cuda: torch sees no CUDA device")


def check_cpu_backend(parser: argparse.ArgumentParser, backend: str) -> None:
    """``parser.error`` for a DEU ``--backend`` that cannot run on CPU float32 tensors (the examples'),
    with the backend's reasons (``cuda`` never can; ``triton`` only under TRITON_INTERPRET=1)."""
    import torch  # noqa: PLC0415

    from kfuse.ops.deu import backend_reasons  # noqa: PLC0415

    why = backend_reasons(torch.zeros(1, 1)).get(backend, [])
    if backend != "auto" and why:
        parser.error(f"--backend {backend}: cannot run on the CPU tensors of this example: {'; '.join(why)}")
