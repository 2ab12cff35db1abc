"""Top functions of a py-spy profile (``py-spy record --format raw``: collapsed stacks).

    py-spy record --pid PID --duration 20 --rate 100 --native --format raw -o prof.txt
    python -m bench.profile_top prof.txt --top 25

Prints, as a share of all samples, the frames where time was spent (self: the leaf of
the stack) and the frames time was spent under (inclusive: anywhere in the stack,
counted once per stack). Frames are py-spy's ``function (file:line)``; ``--no-lines``
merges the lines of a function.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


@dataclass(frozen=True)
class Profile:
    """Sample counts per frame."""

    total: int
    self_samples: Counter[str]
    inclusive: Counter[str]


def _frame(name: str, keep_lines: bool) -> str:
    return name if keep_lines else _LINE.sub(")", name)


def parse_collapsed(lines: Iterable[str], *, keep_lines: bool = True) -> Profile:
    """Fold collapsed-stack lines (``a;b;c 12``) into self and inclusive counts."""
    total = 0
    self_samples: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in lines:
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f, keep_lines) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        self_samples[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return Profile(total, self_samples, inclusive)


def format_top(profile: Profile, top: int) -> str:
    """Two tables: top self and top inclusive frames, as % of samples."""
    lines = [f"{profile.total} samples", "", "self %   frame"]
    for frame, count in profile.self_samples.most_common(top):
        lines.append(f"{100 * count / profile.total:6.1f}   {frame}")
    lines += ["", "incl %   frame"]
    for frame, count in profile.inclusive.most_common(top):
        lines.append(f"{100 * count / profile.total:6.1f}   {frame}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_top", description=__doc__)
    parser.add_argument("profile", type=Path, help="py-spy --format raw output")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-lines", action="store_true", help="merge a function's lines")
    args = parser.parse_args(argv)
    with args.profile.open() as handle:
        profile = parse_collapsed(handle, keep_lines=not args.no_lines)
    if profile.total == 0:
        parser.error(f"{args.profile}: no samples")
    print(format_top(profile, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
