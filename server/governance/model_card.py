"""The model card: one Markdown page a reviewer reads, rendered from the report body."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.governance.plots import CALIBRATION_PNG, SCORES_PNG
from server.manifest import ModelManifest

CARD_FILE = "model_card.md"


def _num(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_card(manifest: ModelManifest, body: dict[str, Any]) -> str:
    """Markdown of the card for ``manifest`` and the (unsealed) report ``body``."""
    training = manifest.training
    metrics = body["metrics"]
    champion = body.get("champion")
    champ_metrics = champion.get("metrics") if champion else None
    lines = [
        f"# Model card: {manifest.name} {manifest.version}",
        "",
        "## Purpose",
        manifest.purpose or "_Not stated in the manifest._",
        "",
        "## Lineage",
        f"- artifact: `{body['artifact']['file']}` sha256 `{body['artifact']['sha256']}`, "
        f"{body['artifact']['size_bytes']} bytes",
        f"- training data snapshot: `{training.data_snapshot}`; code commit: "
        f"`{training.code_commit}`; algorithm: {training.algorithm or 'not stated'}; "
        f"created {training.created_at.isoformat()}",
        f"- features ({len(manifest.features)}): {', '.join(manifest.features)}",
        f"- decision: score >= {manifest.threshold}",
        f"- validated on `{body['holdout']['path']}` ({body['holdout']['rows']} rows, "
        f"{metrics['positives']} positives, sha256 `{body['holdout']['sha256'][:16]}…`)",
        "",
        "## Metrics vs champion",
    ]
    header = "| metric | this version |"
    rule = "| --- | --- |"
    if champion and champ_metrics:
        header += f" champion {champion['version']} |"
        rule += " --- |"
    lines += [header, rule]
    for key in ("auc", "precision", "recall", "brier"):
        row = f"| {key} | {_num(metrics[key])} |"
        if champ_metrics:
            row += f" {_num(champ_metrics[key])} |"
        lines.append(row)
    if champion and not champ_metrics:
        lines.append(f"\nChampion {champion['version']}: {champion['skipped']}")
    elif not champion:
        lines.append("\nNo champion to compare with (no other version).")
    latency = body["latency"]
    online = body["online_check"]
    lines += [
        "",
        f"Latency on this machine (ONNX Runtime, one thread): batch 1 p50 "
        f"{latency['batch_1']['p50_ms']:.3f} ms / p99 {latency['batch_1']['p99_ms']:.3f} ms; "
        f"batch 64 p50 {latency['batch_64']['p50_ms']:.3f} ms / "
        f"p99 {latency['batch_64']['p99_ms']:.3f} ms.",
        f"Online path (server over gRPC vs offline ONNX): "
        f"{'PASSED' if online['passed'] else 'FAILED'}, {online['mismatched']} of "
        f"{online['rows']} rows differ (max |diff| {online['max_abs_diff']:.2e}).",
        "",
        f"![calibration]({CALIBRATION_PNG}) ![score distribution]({SCORES_PNG})",
        "",
        "## Segments",
    ]
    segments = body.get("segments", {})
    if not segments:
        lines.append("_No segment columns given._")
    for column, rates in segments.items():
        lines += [
            f"**{column}** (decision rate = share flagged; adverse-impact ratio = not-flagged "
            "rate / best segment's)",
            "",
            "| segment | rows | decision rate | adverse-impact ratio |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['segment']} | {r['rows']} | {_num(r['decision_rate'])} | "
            f"{_num(r['adverse_impact_ratio'], 3)} |"
            for r in rates
        ]
        lines.append("")
    lines += ["", "## Limitations"]
    lines += [f"- {item}" for item in manifest.limitations] or ["_None stated in the manifest._"]
    return "\n".join(lines) + "\n"


def write_card(version_dir: Path, manifest: ModelManifest, body: dict[str, Any]) -> Path:
    path = version_dir / CARD_FILE
    path.write_text(render_card(manifest, body))
    return path
