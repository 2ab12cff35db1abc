"""``streamscore dev`` options from its command line."""

from __future__ import annotations

import argparse

import pytest

from devstack.stack import DEFAULT_SCORE_RATE, add_dev_arguments, options_from_args


def _options(*argv: str) -> float:
    parser = argparse.ArgumentParser()
    add_dev_arguments(parser)
    return options_from_args(parser.parse_args(argv), None).score_rate


def test_built_in_score_rate_defaults_below_a_slow_producer() -> None:
    """``--rate 10`` alone used to exit 2: the built-in Score default (20/s) exceeded it."""
    assert _options("--rate", "10") == 10.0
    assert _options() == DEFAULT_SCORE_RATE
    assert _options("--rate", "10", "--score-rate", "0") == 0.0


def test_an_explicit_score_rate_above_the_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="score_rate"):
        _options("--rate", "10", "--score-rate", "15")
