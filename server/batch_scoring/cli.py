"""``streamscore score-batch``: score a spine with a served model version, offline.

Exit status: 0 done; 2 bad input (spine, model/version, definitions, events, batch
files; one line naming it, no output file); 1 a dependency failed (Redis).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from feature_streams.backfill_cli import parse_batch_specs, parse_event_specs
from feature_streams.definitions import DefinitionError, FeatureDefinitions, load_definitions
from feature_streams.point_in_time import BackfillError
from feature_streams.spark_engine import SparkUnavailable, partition_entity
from server.batch_scoring.chunk import ChunkJob
from server.batch_scoring.compare import Comparison
from server.batch_scoring.features import PointInTimeFeatures, key_entities
from server.batch_scoring.local import Progress, run_local
from server.batch_scoring.no_pandas import skip_pandas_probe
from server.batch_scoring.online import OnlineFeatures, OnlineFeaturesError
from server.batch_scoring.output import COMPARISON_KEY, OutputFile
from server.batch_scoring.partitioned import MAX_PARTITIONS, run_partitioned
from server.batch_scoring.reasons import BatchReasons
from server.batch_scoring.scoring import (
    ExplainerError,
    ModelLoadError,
    ModelRef,
    ScoringModel,
    UnknownModelError,
    resolve_version,
)
from server.batch_scoring.spine import SpineError, SpineReader, parse_time, spine_path
from server.explain.service import catalogue_for
from server.manifest import ModelManifest
from server.runtime import RuntimeOptions
from server.settings import Settings, SettingsError, load_settings

__all__ = ["main_score_batch"]

logger = logging.getLogger(__name__)
DEFAULT_CONFIG = Path("config/streamscore.yaml")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamscore score-batch",
        description="Score a spine with a served model version and its features, offline.",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--version", default=None, help="default: the highest version present")
    p.add_argument("--input", required=True, type=Path, help="spine: Parquet or CSV")
    p.add_argument("--output", required=True, type=Path, help="Parquet file to write")
    p.add_argument(
        "--features",
        choices=("point-in-time", "online"),
        default="point-in-time",
        help="point-in-time from --events/--batch (the backfill's code), or the current "
        "values in Redis read by the server's code",
    )
    p.add_argument("--events", action="append", default=[], metavar="[TOPIC=]FILE")
    p.add_argument("--batch", action="append", default=[], metavar="GROUP=VALID_FROM_MS:FILE")
    p.add_argument("--allow-missing-columns", action="store_true")
    p.add_argument("--definitions", type=Path, default=None)
    p.add_argument("--timestamp-column", default="ts_ms")
    p.add_argument("--as-of", default=None, metavar="T", help="epoch ms or ISO-8601, every row")
    p.add_argument("--keep", default="", metavar="A,B", help="more spine columns to copy out")
    p.add_argument("--with-features", action="store_true")
    p.add_argument(
        "--reasons",
        action="store_true",
        help="reason codes per row (the catalogue's, as the Score answer): needs an explainer",
    )
    p.add_argument("--compare-version", default=None, metavar="V2")
    p.add_argument("--segment-by", default=None, metavar="COLUMN")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--chunk-rows", type=int, default=100_000)
    p.add_argument(
        "--key-partitions",
        type=_partitions,
        default=1,
        metavar="K",
        help="local engine, point-in-time: score K key partitions one at a time per worker "
        "(each reads only its keys' events and snapshot rows: memory / K); default 1",
    )
    p.add_argument("--engine", choices=("local", "spark"), default="local")
    p.add_argument("--spark-master", default="local[*]")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    return p


def _partitions(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_PARTITIONS:
        raise argparse.ArgumentTypeError(
            f"must be an integer from 1 to {MAX_PARTITIONS}, got {text!r}"
        )
    return value


def _settings(args: argparse.Namespace) -> Settings:
    config: Path | None = args.config
    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    return load_settings(config, os.environ, args.overrides)


def main_score_batch(argv: Sequence[str] | None = None, *, own_process: bool = False) -> int:
    """Entry point; returns the exit status. ``own_process``: the process runs this
    command only (the console script), so process-wide settings are allowed: the local
    engine keeps pyarrow from importing pandas (:mod:`.no_pandas`)."""
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if own_process and args.engine == "local":
        skip_pandas_probe()  # ~0.4 s of CPU before the workers fork; Spark needs pandas
    if args.key_partitions > 1 and (args.engine != "local" or args.features != "point-in-time"):
        parser.error("argument --key-partitions: needs --engine local --features point-in-time")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    try:
        return _run(args)
    except (
        SpineError,
        UnknownModelError,
        BackfillError,
        DefinitionError,
        ModelLoadError,
        ExplainerError,
        OnlineFeaturesError,
        SettingsError,
    ) as exc:
        text = str(exc).replace("\n", "; ")
        sys.stderr.write(f"streamscore score-batch: {text}\n")
        return 2
    except SparkUnavailable as exc:
        sys.stderr.write(f"streamscore score-batch: {exc}\n")
        return 2
    except Exception as exc:
        if not isinstance(exc, OSError | _redis_error()):
            raise
        sys.stderr.write(f"streamscore score-batch: {exc}\n")
        return 1


def _redis_error() -> type[Exception]:
    """The Redis client's error type when the client is in use (``--features online``
    imports it); else ``OSError``: the local engine does not import redis (~0.1 s)."""
    errors = sys.modules.get("redis.exceptions")
    return OSError if errors is None else cast(type[Exception], errors.RedisError)


def _run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    repository = settings.models.repository
    version = resolve_version(repository, args.model, args.version)
    serving = settings.serving_for(args.model)
    runtime = RuntimeOptions("inline", serving.intra_op_threads, serving.inter_op_threads)
    ref = ModelRef(repository, args.model, version, runtime)
    base = ScoringModel.load(ref)  # sha256 + graph checked before any work
    manifest = base.manifest
    compare: ModelRef | None = None
    compare_manifest: ModelManifest | None = None
    if args.compare_version is not None:
        other = resolve_version(repository, args.model, args.compare_version)
        compare = ModelRef(repository, args.model, other, runtime)
        compare_manifest = ScoringModel.load(compare).manifest
    definitions_path = args.definitions or settings.features.definitions_path
    if definitions_path is None:
        definitions_path = Path("features.yaml")
    definitions = load_definitions(definitions_path)
    reasons: BatchReasons | None = None
    if args.reasons and manifest.explainer is None:
        logger.warning(
            "model %s/%s has no explainer: no reasons column written", args.model, version
        )
    elif args.reasons:
        ScoringModel.load(ref, explain=True)  # refuse a bad explainer up front
        try:
            catalogue = catalogue_for(manifest, definitions)
        except ValueError as error:
            raise ModelLoadError(f"{args.model}/{version}: reason catalogue: {error}") from error
        reasons = BatchReasons(catalogue, serving.reasons.top_n)
    wanted = list(manifest.features)
    if compare_manifest is not None:
        wanted += [f for f in compare_manifest.features if f not in wanted]
    features: PointInTimeFeatures | OnlineFeatures
    if args.features == "online":
        if compare_manifest is not None and compare_manifest.features != manifest.features:
            raise SpineError("--compare-version with --features online needs equal feature lists")
        features = OnlineFeatures(
            definitions, manifest, str(settings.redis.url), settings.features.fetch_timeout_s
        )
    else:
        if not args.events and definitions.stream_groups:
            raise BackfillError("--events is required with --features point-in-time")
        pit = PointInTimeFeatures(
            definitions,
            tuple(wanted),
            _event_paths(args.events, definitions),
            parse_batch_specs(args.batch),
            args.allow_missing_columns,
            whole_log=args.engine == "local",
        )
        pit.check()
        features = pit
    entities = [definitions.entities[e] for e in key_entities(definitions, wanted)]
    reader = SpineReader(
        spine_path(args.input),
        entities,
        args.timestamp_column,
        parse_time(args.as_of) if args.as_of is not None else None,
        max(1, args.chunk_rows),
    )
    names = reader.column_names()
    keep = [c.strip() for c in args.keep.split(",") if c.strip()]
    for column in [*keep, *([args.segment_by] if args.segment_by else [])]:
        if column not in names:
            raise SpineError(f"{args.input}: column {column!r} missing (row 1, the header)")
    keys = [e.name for e in entities] + ["ts_ms"] + keep
    if args.segment_by:
        keys.append(args.segment_by)
    job = ChunkJob(
        ref,
        features,
        tuple(dict.fromkeys(keys)),
        compare,
        args.with_features,
        reasons,
    )
    lineage = _lineage(args, manifest, compare_manifest, definitions_path)
    comparison = (
        Comparison(version, compare.version, args.segment_by) if compare is not None else None
    )
    progress = None if args.no_progress else Progress(reader.total_rows())
    started = time.monotonic()
    with OutputFile(args.output, lineage) as out:

        def sink(table: Any) -> None:
            out.write(table)
            if comparison is not None:
                comparison.add(table)

        if args.engine == "spark":
            from server.batch_scoring.spark import run_spark

            key = partition_entity(definitions, wanted)
            rows = run_spark(job, reader, sink, args.spark_master, key, progress)
        elif args.key_partitions > 1 and (key := partition_entity(definitions, wanted)):
            rows = run_partitioned(
                job,
                reader.chunks(),
                sink,
                definitions.entities[key],
                args.key_partitions,
                max(1, args.workers),
                args.output.resolve().parent,
                max(1, args.chunk_rows),
                progress,
            )
        else:
            rows = run_local(
                job,
                reader.chunks(),
                sink,
                max(1, args.workers),
                progress,
                args.output.resolve().parent,
            )
        extra = {COMPARISON_KEY: comparison.summary()} if comparison is not None else None
        out.commit(extra)
    if progress is not None:
        progress.finish()
    if comparison is not None:
        sys.stdout.write(json.dumps(comparison.summary(), indent=2) + "\n")
    logger.info(
        "%d rows scored by %s/%s -> %s in %.1fs",
        rows,
        args.model,
        version,
        args.output,
        time.monotonic() - started,
    )
    return 0


def _event_paths(specs: Sequence[str], definitions: FeatureDefinitions) -> str | dict[str, str]:
    if not specs:
        return {}
    parsed = parse_event_specs(specs, definitions)
    if isinstance(parsed, Mapping):
        return {topic: str(path) for topic, path in parsed.items()}
    return str(parsed)


def _lineage(
    args: argparse.Namespace,
    manifest: ModelManifest,
    compare: ModelManifest | None,
    definitions: Path,
) -> dict[str, Any]:
    def model(m: ModelManifest) -> dict[str, Any]:
        return {
            "name": m.name,
            "version": m.version,
            "sha256": m.sha256,
            "threshold": m.threshold,
            "features": list(m.features),
            "training": json.loads(m.training.model_dump_json()),
        }

    return {
        "model": model(manifest),
        "compare": model(compare) if compare is not None else None,
        "features_source": args.features,
        "definitions": str(definitions),
        "events": list(args.events),
        "batch": list(args.batch),
        "spine": str(args.input),
        "as_of": args.as_of,
        "engine": args.engine,
        "created_at": datetime.now(UTC).isoformat(),
        "command": ["streamscore", "score-batch", *sys.argv[2:]],
    }
