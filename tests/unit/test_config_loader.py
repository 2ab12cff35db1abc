"""The layered loader is generic: any frozen pydantic schema, any env prefix."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.config_loader import KeyedError, SettingsError, load_layers


class _Pool(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(default=4, ge=1)
    max_size: int = 8

    @model_validator(mode="after")
    def _fits(self) -> _Pool:
        if self.size > self.max_size:
            raise KeyedError.one("size exceeds max_size", ("size",), ("max_size",))
        return self


class _App(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "app"
    pool: _Pool = Field(default_factory=_Pool)


def test_layers_apply_in_order_with_their_own_prefix(tmp_path: Path) -> None:
    config = tmp_path / "app.yaml"
    config.write_text("name: from-file\npool:\n  size: 2\n  max_size: 3\n")
    env = {"APP_POOL__SIZE": "3", "STREAMSCORE_NAME": "ignored"}
    loaded = load_layers(_App, config, env, ["name=from-set"], env_prefix="APP_")
    assert loaded == _App(name="from-set", pool=_Pool(size=3, max_size=3))
    assert load_layers(_App, None, {}, [], env_prefix="APP_") == _App()


def test_a_cross_field_problem_names_each_key_and_its_source() -> None:
    with pytest.raises(SettingsError) as caught:
        load_layers(_App, None, {"APP_POOL__SIZE": "9"}, ["pool.bogus=1"], env_prefix="APP_")
    assert "pool.bogus: unknown key (from --set pool.bogus)" in caught.value.problems
    with pytest.raises(SettingsError) as caught:
        load_layers(_App, None, {"APP_POOL__SIZE": "9"}, [], env_prefix="APP_")
    assert caught.value.problems == (
        "pool.size: size exceeds max_size (from env APP_POOL__SIZE, default)",
    )
