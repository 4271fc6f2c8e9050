"""Call-cache keys: they follow everything that shapes a response, and nothing else, and never the API key (D6)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import BaseModel

from codeclm.llm.cache import call_key
from codeclm.llm.gateway import Call, Gateway, Reply
from codeclm.settings import Settings

BASE = "http://127.0.0.1:9/v1"  # never contacted: computing a key makes no request


class Answer(BaseModel):
    answer: str


class Other(BaseModel):
    answer: str
    confidence: float


def _settings(tmp_path: Path, model: str = "openai/fake-strong", api_base: str = BASE, **role: object) -> Settings:
    settings = Settings.load(None, strong=model, target="openai/fake-target", home=tmp_path / "home")
    settings.strong.api_base = api_base
    settings.strong.output_mode = "json_schema"
    for name, value in role.items():
        setattr(settings.strong, name, value)
    return settings


def _call(**changes: object) -> Call:
    call = Call(role="strong", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                output=Answer, prompt_version="v1", stage="encode", item_id="seed-1")
    return dataclasses.replace(call, **changes)


def _key(tmp_path: Path, call: Call | None = None, **settings: object) -> str:
    return Gateway(_settings(tmp_path, **settings)).key(call or _call())


CHANGES: dict[str, Callable[[Path], str]] = {
    "model": lambda tmp: _key(tmp, model="openai/fake-other"),
    "api_base": lambda tmp: _key(tmp, api_base="http://127.0.0.1:10/v1"),
    "messages": lambda tmp: _key(tmp, _call(messages=[{"role": "user", "content": "hi!"}])),
    "system message": lambda tmp: _key(tmp, _call(messages=[{"role": "system", "content": "be long"},
                                                            {"role": "user", "content": "hi"}])),
    "message role": lambda tmp: _key(tmp, _call(messages=[{"role": "user", "content": "be brief"},
                                                          {"role": "user", "content": "hi"}])),
    "temperature on the call": lambda tmp: _key(tmp, _call(temperature=0.3)),
    "temperature of the role": lambda tmp: _key(tmp, temperature=0.1),
    "max_tokens on the call": lambda tmp: _key(tmp, _call(max_tokens=17)),
    "max_tokens of the role": lambda tmp: _key(tmp, max_tokens=18),
    "output schema": lambda tmp: _key(tmp, _call(output=Other)),
    "plain text output": lambda tmp: _key(tmp, _call(output=None, reply=Reply.TEXT)),
    "output protocol": lambda tmp: _key(tmp, output_mode="json_object"),
    "prompt version": lambda tmp: _key(tmp, _call(prompt_version="v2")),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_key_changes_with_what_shapes_the_response(change: str, tmp_path: Path) -> None:
    assert CHANGES[change](tmp_path) != _key(tmp_path)


def test_all_variations_give_distinct_keys(tmp_path: Path) -> None:
    keys = [_key(tmp_path)] + [make(tmp_path) for make in CHANGES.values()]
    assert len(set(keys)) == len(keys)


def test_key_ignores_bookkeeping_fields(tmp_path: Path) -> None:
    """Stage and item id say where a result goes, not what it is: equal requests share one cache entry."""
    assert _key(tmp_path, _call(stage="evaluate", item_id="q-9")) == _key(tmp_path)


def test_key_follows_the_effective_request(tmp_path: Path) -> None:
    """A value given on the call or inherited from the role is the same request, so the same key."""
    assert _key(tmp_path, _call(max_tokens=17)) == _key(tmp_path, max_tokens=17)
    assert _key(tmp_path, _call(temperature=0.3)) == _key(tmp_path, temperature=0.3)


def test_key_is_stable_under_dict_reordering(tmp_path: Path) -> None:
    reordered = _call(messages=[{"content": "be brief", "role": "system"}, {"content": "hi", "role": "user"}])
    assert _key(tmp_path, reordered) == _key(tmp_path)
    parts = {"model": "m", "messages": [{"role": "user", "content": "x"}], "params": {"a": 1, "b": [1, 2]}}
    assert call_key(**parts) == call_key(**dict(reversed(parts.items())))
    assert call_key(**parts) == call_key(**{**parts, "params": {"b": [1, 2], "a": 1}})
    assert call_key(**parts) != call_key(**{**parts, "params": {"a": 1, "b": [2, 1]}})


def test_key_is_a_plain_sha256(tmp_path: Path) -> None:
    key = _key(tmp_path)
    assert len(key) == 64 and set(key) <= set("0123456789abcdef")
    assert _key(tmp_path) == key  # a new Gateway computes the same key


def test_api_key_never_enters_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = []
    for secret in ("sk-canary-one-1234567890", "sk-canary-two-0987654321"):
        monkeypatch.setenv("CODECLM_TEST_API_KEY", secret)
        gateway = Gateway(_settings(tmp_path, api_key_env="CODECLM_TEST_API_KEY"))
        assert gateway.endpoint("strong").api_key == secret  # the key is really in use for the call
        keys.append(gateway.key(_call()))
    assert keys[0] == keys[1]
    monkeypatch.delenv("CODECLM_TEST_API_KEY")
    assert keys[0] == _key(tmp_path)  # and equals the key of the same role without any API key
