"""Hub ids: one that is neither a folder nor cached fails within seconds, saying why and what to do.

The machine running the tests may have no network: an unknown hub id must not spend its time in
the hub client's retries, and a cached one must load without the network at all.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from rftlab.models.loading import ModelNotFoundError, default_model_dir, load_causal_lm, load_tokenizer, tiny_llama

MISSING = "nobody-here/no-such-model-xyz"
CACHED = "somebody/tiny-cached-model"
FAST = 10.0  # seconds: a failure must not wait for retries (they took ~50 s)


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache: HF_HOME for subprocesses, the hub client's constant for this one
    (huggingface_hub reads the environment once, at import)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hub = tmp_path / "hf" / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return hub


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _assert_explains(message: str) -> None:
    for text in (repr(MISSING), "local folder", "Hugging Face cache", "'default'"):
        assert text in message, f"{text} not in: {message}"


@pytest.mark.parametrize("load", [load_tokenizer, lambda name: load_causal_lm(name)], ids=["tokenizer", "model"])
def test_an_unknown_hub_id_fails_fast_with_a_clear_message(load, empty_hub_cache):
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        load(MISSING)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    _assert_explains(message)
    assert "Hub" in message and ("could not be reached" in message or "no model repository" in message), message
    assert elapsed < FAST, f"took {elapsed:.1f} s"


def test_offline_mode_fails_at_once(empty_hub_cache, monkeypatch):
    _offline(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE") as info:
        load_tokenizer(MISSING)
    assert time.perf_counter() - start < 2.0
    _assert_explains(str(info.value))


def _cache_repository(hub: Path, repo_id: str, weights: bool = True) -> None:
    """A hub cache entry of ``repo_id``: the default model's tokenizer and the tiny model's config
    and (with ``weights``) its weights."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    source = default_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, snapshot / name)
    model = tiny_llama(len(load_tokenizer("tiny")))
    if weights:
        model.save_pretrained(snapshot)
    else:
        model.config.save_pretrained(snapshot)


def test_a_cached_hub_id_loads_without_the_network(empty_hub_cache, monkeypatch):
    from rftlab.models.loading import model_context_length

    _cache_repository(empty_hub_cache, CACHED)
    start = time.perf_counter()
    tokenizer = load_tokenizer(CACHED)
    model = load_causal_lm(CACHED)
    assert model_context_length(CACHED) == 2048
    assert time.perf_counter() - start < FAST  # no network attempt (one would fail, then retry)
    assert model.config.vocab_size == len(tokenizer)
    _offline(monkeypatch)
    assert load_tokenizer(CACHED).pad_token_id is not None


def test_a_partly_cached_hub_id_fails_fast_saying_so(empty_hub_cache):
    _cache_repository(empty_hub_cache, CACHED, weights=False)  # as after loading only its tokenizer
    assert load_tokenizer(CACHED).pad_token_id is not None
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match=r"has only part of it in the local Hugging Face cache.*'default'"):
        load_causal_lm(CACHED)
    assert time.perf_counter() - start < FAST
