"""``streamscore features load|rollback`` and ``streamscore stream`` from the command
line, against a real redis-server: success, and bad input or a dependency down as
one clear line and an exit code, never a traceback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from devstack.services import free_port
from feature_streams.batch_store import get_pointers
from server.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DEFINITIONS = Path(__file__).resolve().parents[2] / "features.yaml"


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def _cli(redis_url: str, *argv: str, definitions: Path = DEFINITIONS) -> int:
    config = ["--set", f"redis.url={redis_url}"]
    config += ["--set", f"features.definitions_path={definitions}"]
    return main([*argv[:2], *config, *argv[2:]])


async def _acli(redis_url: str, *argv: str) -> int:
    """``_cli`` off the test's event loop (the command runs its own)."""
    return await asyncio.to_thread(_cli, redis_url, *argv)


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cards.csv"
    path.write_text(text)
    return path


async def test_load_then_rollback(
    redis_url: str, redis_client: Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _csv(tmp_path, "card_id,card_age_days,preapproved_limit\nc1,10,1000\n")
    load = ["features", "load", "--group", "card_profile", "--input"]
    assert await _acli(redis_url, *load, str(first)) == 0
    active, _ = await get_pointers(redis_client, "card_profile")
    assert active is not None
    second = _csv(tmp_path, "card_id,card_age_days,preapproved_limit\nc1,11,1100\n")
    assert await _acli(redis_url, *load, str(second)) == 0
    newer, previous = await get_pointers(redis_client, "card_profile")
    assert previous == active and newer != active
    assert await _acli(redis_url, "features", "rollback", "--group", "card_profile") == 0
    assert (await get_pointers(redis_client, "card_profile"))[0] == active
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (("load", "--group", "card_profile", "--input", "BAD_COLUMN"), 1, "preapproved_limt"),
        (("load", "--group", "nogroup", "--input", "GOOD"), 1, "nogroup"),
        (("load", "--group", "card_profile", "--input", "MISSING"), 1, "missing.csv"),
        (("rollback", "--group", "bad:name"), 1, "bad:name"),
    ],
    ids=["bad-column", "unknown-group", "missing-file", "bad-group-name"],
)
async def test_bad_input_is_one_clear_line_and_nothing_is_written(
    redis_url: str,
    redis_client: Redis,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    code: int,
    needle: str,
) -> None:
    files = {
        "BAD_COLUMN": _csv(tmp_path, "card_id,card_age_days,preapproved_limt\nc1,10,1000\n"),
        "GOOD": tmp_path / "good.csv",
        "MISSING": tmp_path / "missing.csv",
    }
    files["GOOD"].write_text("card_id,card_age_days,preapproved_limit\nc1,10,1000\n")
    argv = tuple(str(files.get(a, a)) for a in argv)
    assert await _acli(redis_url, "features", *argv) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert await redis_client.dbsize() == 0


@pytest.mark.parametrize("command", ["load", "stream"])
def test_broken_definitions_and_redis_down_are_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    cards = _csv(tmp_path, "card_id,card_age_days,preapproved_limit\nc1,10,1000\n")
    broken = tmp_path / "features.yaml"
    broken.write_text("version: 1\nentities: {card_id: {}}\nbatch_groups: {g: {entity: nope}}\n")
    down = f"redis://127.0.0.1:{free_port()}/0"
    argv = (
        ["features", "load", "--group", "card_profile", "--input", str(cards)]
        if command == "load"
        else ["stream"]
    )
    assert _cli(down, *argv, definitions=broken) == 2
    err = capsys.readouterr().err
    assert "feature definitions" in err and "Traceback" not in err, err
    if command == "load":  # the worker retries Redis instead of exiting
        assert _cli(down, *argv) == 1
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and last.startswith("streamscore: Error"), err
