"""CLI: python -m kernels_check [--json] [--bench]."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels_check", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as JSON (schema in kernels_check/__init__.py)")
    parser.add_argument("--bench", action="store_true", help="also time ops and 7B-shaped decode (GPU only)")
    args = parser.parse_args(argv)

    from . import build_report, format_text

    report = build_report(bench=args.bench)
    print(json.dumps(report, indent=1) if args.json else format_text(report), flush=True)
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
