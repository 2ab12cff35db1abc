"""``streamscore models validate NAME VERSION --holdout FILE``.

Exit codes: 0 validated (online path equal), 1 the online-path check failed (the
report is written and says so), 2 bad input (unknown version, holdout lacking
columns, unreadable file), one line on stderr naming the problem.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from server.governance.holdout import HoldoutError, read_holdout
from server.governance.validation import ValidationError, write_validation_artifacts
from server.manifest import MANIFEST_FILE


def build_parser(prog: str = "streamscore models validate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Validate a model version on a labelled holdout: report, model card, "
        "plots and reference profile, written beside the version.",
    )
    parser.add_argument("name", help="model name")
    parser.add_argument("version", help="version to validate")
    parser.add_argument("--holdout", type=Path, required=True, help="Parquet or CSV file")
    parser.add_argument("--label", default="label", help="0/1 label column (default: label)")
    parser.add_argument(
        "--segments", default="", help="comma-separated segment columns (decision rate, AIR)"
    )
    parser.add_argument("--champion", help="version to compare with (default: highest other)")
    parser.add_argument("--repository", type=Path, default=Path("models"))
    return parser


def main_validate(argv: Sequence[str], prog: str = "streamscore models validate") -> int:
    """Run the command; see the module docstring for exit codes."""
    args = build_parser(prog).parse_args(list(argv))
    logging.basicConfig(level=logging.WARNING)
    version_dir = args.repository / args.name / args.version
    if not (version_dir / MANIFEST_FILE).is_file():
        sys.stderr.write(
            f"streamscore: {args.name}/{args.version}: no such version in {args.repository}\n"
        )
        return 2
    segments = [s.strip() for s in args.segments.split(",") if s.strip()]
    try:
        holdout = read_holdout(args.holdout)
        result = write_validation_artifacts(
            version_dir,
            holdout,
            label=args.label,
            segments=segments,
            champion_version=args.champion,
        )
    except (HoldoutError, ValidationError) as error:
        sys.stderr.write(f"streamscore: {error}\n")
        return 2
    m = result.metrics
    online = result.online
    sys.stdout.write(
        f"{args.name}/{args.version}: auc {m.auc:.4f}, recall {m.recall:.4f} at "
        f"{m.threshold}, brier {m.brier:.4f}; online path "
        f"{'equal' if online.passed else f'DIFFERS on {online.mismatched} rows'}; "
        f"report {result.report_path} sha256 {result.report_sha256}\n"
    )
    return 0 if online.passed else 1
