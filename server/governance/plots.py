"""The model card's PNG plots (matplotlib, Agg, no global pyplot state).

matplotlib is a training-side dependency (extra ``train``): a reviewer-readable
plot needs axes, ticks, labels and a legend, i.e. text rendering, which a
hand-written rasteriser would only imitate badly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from server.governance.quality import ReliabilityBin

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CALIBRATION_PNG = "calibration.png"
SCORES_PNG = "score_distribution.png"
_PNG_METADATA = {"Software": None}  # no version string: same inputs, same bytes


def _figure() -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # an optional dependency: say which
        raise RuntimeError("plots need matplotlib: pip install 'streamscore[train]'") from error
    return Figure(figsize=(5.5, 4.0), dpi=100)


def calibration_plot(path: Path, curves: Sequence[tuple[str, Sequence[ReliabilityBin]]]) -> Path:
    """Reliability diagram: mean score vs observed positive rate per bin, per version."""
    figure = _figure()
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect")
    for label, bins in curves:
        used = [b for b in bins if b.count]
        axes.plot(
            [b.mean_score or 0.0 for b in used],
            [b.positive_rate or 0.0 for b in used],
            marker="o",
            label=label,
        )
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("mean predicted score (bin)")
    axes.set_ylabel("observed positive rate")
    axes.set_title("Calibration on the holdout")
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, format="png", metadata=_PNG_METADATA)
    return path


def score_plot(
    path: Path,
    scores: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int8],
    threshold: float,
) -> Path:
    """Score histograms of negatives and positives (log counts) with the threshold."""
    figure = _figure()
    axes = figure.add_subplot()
    edges = [i / 50 for i in range(51)]
    axes.hist(scores[labels == 0], bins=edges, alpha=0.6, label="label 0")
    axes.hist(scores[labels == 1], bins=edges, alpha=0.6, label="label 1")
    axes.axvline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
    axes.set_yscale("log")
    axes.set_xlabel("score")
    axes.set_ylabel("rows (log)")
    axes.set_title("Score distribution on the holdout")
    axes.legend(loc="upper center")
    figure.tight_layout()
    figure.savefig(path, format="png", metadata=_PNG_METADATA)
    return path
