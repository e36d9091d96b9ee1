"""Report of a training run: a W&B Report when a key, online mode and the network exist,
otherwise a self-contained local HTML file (tables + embedded PNG plots).

    python eval/report.py RUN [--out report.html] [--kind auto|html|wandb]

RUN is train/train.py's output_dir. Prints which kind of report it made, and where.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", help="the run's output_dir")
    p.add_argument("--out", default=None, help="HTML file (default RUN/report.html)")
    p.add_argument("--kind", choices=("auto", "html", "wandb"), default="auto")
    args = p.parse_args(argv)
    from hybridlm.report import ReportError, build_report

    try:
        kind, where, why = build_report(args.run, args.out, args.kind)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if kind == "wandb":
        print(f"made a W&B Report: {where}")
    else:
        print(f"made a local HTML report (not W&B: {why}): {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
