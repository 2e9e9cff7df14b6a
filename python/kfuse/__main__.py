"""``python -m kfuse``: check every available backend against the reference and time it.

For each op family in :data:`kfuse.bench.OPS`, every kfuse backend that can run is checked
against the float64 reference on fresh random inputs and timed against the baselines a user
would otherwise pick (each op's bench module lists them; DEU: the eager PyTorch reference,
``torch.compile`` of it and of a PyTorch implementation written for speed, forward and
forward+backward; LoRA: the base GEMM ``x Wᵀ`` every row is divided by, PEFT's ``lora.Linear``,
base + ``addmm_``, ``torch.compile``, forward, backward, multi-adapter and a PEFT training
step), on one device; ``--ops`` picks the op families. Progress goes to stderr; the tables (one
per op) are printed last; ``report.json`` and ``report.png`` are written to ``--out``. Exit
status 1 when a kfuse backend raised or missed its tolerance (baseline failures are recorded,
not fatal).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from kfuse.bench import OPS
from kfuse.demos._args import unwritable
from kfuse.report import Progress, format_table, run_report, save_png


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kfuse",
        description="Check every available kfuse backend against the float64 reference and time it "
        "against the eager and torch.compile baselines; writes report.json and report.png.")
    p.add_argument("--quick", action="store_true", help="fewer, smaller cases and shorter timings")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to run on (default: cuda when available, else cpu)")
    p.add_argument("--ops", default=",".join(OPS),
                   help=f"comma-separated op families (default and choices: {','.join(OPS)})")
    p.add_argument("--out", type=Path, default=Path("report_out"),
                   help="folder for report.json and report.png (default: report_out/)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the random inputs (default 0)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="record cases that would start after this many seconds as skipped")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the report; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.ops.split(",") if n.strip()]
    if unknown := [n for n in names if n not in OPS]:
        parser.error(f"unknown op(s) {unknown}; choose from {sorted(OPS)}")
    if not names:
        parser.error(f"--ops: no op named; choose from {sorted(OPS)}")
    if args.time_budget is not None and not (0 < args.time_budget < math.inf):  # (nan too)
        parser.error(f"--time-budget must be a positive number of seconds; got {args.time_budget:g}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be in [0, 2**63); got {args.seed}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: exists and is not a folder")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"--out {args.out}: {err.strerror or err}")
    if why := unwritable(args.out):  # else it failed at the first case's save (bug hunt)
        parser.error(f"--out {args.out}: cannot write there: {why}")
    json_path, png_path = args.out / "report.json", args.out / "report.png"
    for target in (json_path, png_path):  # (else an IsADirectoryError after the whole run: files hunt)
        if target.is_dir():
            parser.error(f"--out {args.out}: {target.name} there is a folder; remove it or choose another --out")
    progress = Progress()
    report = run_report({n: OPS[n] for n in names}, device, args.quick, args.seed, json_path,
                        args.time_budget, progress)
    progress(f"wrote {json_path}")
    png_path.unlink(missing_ok=True)  # never leave an earlier run's chart beside this JSON
    why_not = save_png(report, png_path)
    progress(why_not or f"wrote {png_path}")
    progress("done")
    print(format_table(report))
    # A case where every kfuse backend was skipped checked nothing (a stale or missing
    # extension, say): the report fails then, so `make report` cannot pass on baselines alone.
    # (A skipped kfuse candidate that needs an optional library, kfuse.integrations.peft, counts as
    # accounted for: its row says why.)
    ran = {(r.op, r.shape, r.dtype, r.mode) for r in report.rows
           if r.kind == "backend" and (r.status != "skipped" or r.optional)}
    cases = {(r.op, r.shape, r.dtype, r.mode) for r in report.rows if r.kind == "baseline"}
    for case in sorted(cases - ran):
        print(f"kfuse report: no kfuse backend ran on {' '.join(case)}; see the skipped rows above "
              "and kfuse.availability()", file=sys.stderr)
    # (A case whose inputs could not be built is a bad row: see Row.bad.)
    return 1 if any(r.bad for r in report.rows) or cases - ran else 0


if __name__ == "__main__":
    sys.exit(main())
