"""``streamscore features backfill``: the command line over :mod:`feature_streams.backfill`
(local engine) and :mod:`feature_streams.backfill_spark` (``--engine spark``).

Kept apart from the backfill's I/O so the Spark engine, which builds on that I/O, is
never imported by it (no import cycle)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from feature_streams.backfill import EventSource, backfill, read_manifest_features
from feature_streams.definitions import DefinitionError, FeatureDefinitions, load_definitions
from feature_streams.point_in_time import (
    DEFAULT_TIMESTAMP_COLUMN,
    BackfillError,
)
from feature_streams.spark_engine import SparkUnavailable

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamscore features backfill",
        description="Point-in-time feature values for a spine, as the online path serves them.",
    )
    p.add_argument(
        "--events",
        action="append",
        required=True,
        metavar="[TOPIC=]FILE",
        help="event log (JSON lines or Parquet) in log order; TOPIC= when several topics",
    )
    p.add_argument("--spine", required=True, type=Path, help="Parquet or CSV spine")
    p.add_argument("--out", required=True, type=Path, help="output Parquet file")
    p.add_argument("--definitions", type=Path, default=Path("features.yaml"))
    p.add_argument(
        "--batch",
        action="append",
        default=[],
        metavar="GROUP=VALID_FROM_MS:FILE",
        help="a batch snapshot file and when it became active; repeatable",
    )
    select = p.add_mutually_exclusive_group()
    select.add_argument(
        "--features-from-manifest",
        type=Path,
        metavar="PATH",
        help="only the features of this manifest.json (or version directory), in its order",
    )
    select.add_argument("--features", metavar="A,B,...", help="only these features, in order")
    p.add_argument("--timestamp-column", default=DEFAULT_TIMESTAMP_COLUMN)
    p.add_argument(
        "--allow-missing-columns", action="store_true", help="batch files may lack fields"
    )
    p.add_argument(
        "--engine",
        choices=("local", "spark"),
        default="local",
        help="spark: the same point-in-time code per entity partition (the 'spark' extra)",
    )
    p.add_argument("--spark-master", default="local[*]", help="any Spark master URL")
    p.add_argument("--log-level", default="INFO")
    return p


def parse_batch_specs(specs: Sequence[str]) -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = {}
    for spec in specs:
        group, sep, rest = spec.partition("=")
        start, colon, path = rest.partition(":")
        if not (sep and colon and group and path) or not start.lstrip("-").isdigit():
            raise BackfillError(f"--batch {spec!r}: expected GROUP=VALID_FROM_MS:FILE")
        out.setdefault(group, []).append((int(start), path))
    return out


def parse_event_specs(
    specs: Sequence[str], definitions: FeatureDefinitions
) -> EventSource | dict[str, EventSource]:
    topics = {g.topic for g in definitions.stream_groups.values()}
    by_topic: dict[str, EventSource] = {}
    for spec in specs:
        topic, sep, path = spec.partition("=")
        if not sep or topic not in topics:
            if len(specs) > 1:
                raise BackfillError(f"--events {spec!r}: with several files, write TOPIC=FILE")
            return spec
        by_topic[topic] = path
    return by_topic


def main_backfill(argv: Sequence[str] | None = None) -> int:
    """``streamscore features backfill`` entry point; returns the exit status.

    A leading ``--`` is ignored (``streamscore features backfill -- --events ...``).
    """
    words = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(words[1:] if words[:1] == ["--"] else words)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        definitions = load_definitions(args.definitions)
        features: Sequence[str] | None = None
        if args.features_from_manifest is not None:
            features = read_manifest_features(args.features_from_manifest)
        elif args.features:
            features = [n.strip() for n in args.features.split(",") if n.strip()]
        if args.engine == "spark":
            return _backfill_spark(args, definitions, features)
        report = backfill(
            definitions,
            parse_event_specs(args.events, definitions),
            args.spine,
            args.out,
            batch_snapshots=parse_batch_specs(args.batch),
            features=features,
            timestamp_column=args.timestamp_column,
            allow_missing_columns=args.allow_missing_columns,
        )
    except (DefinitionError, BackfillError, SparkUnavailable) as exc:
        logger.error("%s", exc)
        return 2
    logger.info(
        "%d rows x %d features -> %s in %.2fs (%d events read, %d malformed, late %s)",
        report.rows,
        len(report.features),
        report.out,
        report.elapsed_s,
        report.events_read,
        report.events_malformed,
        dict(report.events_late),
    )
    return 0


def _backfill_spark(
    args: argparse.Namespace, definitions: FeatureDefinitions, features: Sequence[str] | None
) -> int:
    from feature_streams.backfill_spark import backfill_spark

    events = parse_event_specs(args.events, definitions)
    if not isinstance(events, str | os.PathLike | Mapping):  # pragma: no cover - CLI: paths
        raise BackfillError("--engine spark reads event files by path")
    report = backfill_spark(
        definitions,
        events,  # type: ignore[arg-type]
        args.spine,
        args.out,
        master=args.spark_master,
        batch_snapshots=parse_batch_specs(args.batch),
        features=features,
        timestamp_column=args.timestamp_column,
        allow_missing_columns=args.allow_missing_columns,
    )
    logger.info(
        "%d rows x %d features -> %s in %.2fs (spark %s; event counts: use the local engine)",
        report.rows,
        len(report.features),
        report.out,
        report.elapsed_s,
        args.spark_master,
    )
    return 0
