"""Teacher cache entries: named after the recipe (not the source text), built once when two
builders want the same entry at the same time."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from logitcache.demo import assets, large_vocab, teacher


def test_recipe_digest_follows_the_values_not_their_order() -> None:
    recipe = teacher.recipe(teacher.DEMO_LANGUAGE)
    assert assets.recipe_digest(recipe) == assets.recipe_digest(dict(reversed(recipe.items())))
    assert assets.recipe_digest(recipe) != assets.recipe_digest({**recipe, "train_steps": 401})
    bigger = replace(teacher.DEMO_LANGUAGE, train_steps=teacher.TRAIN_STEPS + 1)
    assert assets.recipe_digest(teacher.recipe(bigger)) != assets.recipe_digest(recipe)


def test_large_vocab_entry_is_named_after_the_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOGITCACHE_CACHE", str(tmp_path))
    built: list[Path] = []

    def build(out: Path, seed: int = 0) -> Path:
        built.append(out)
        out.mkdir()
        (out / large_vocab.HELD_OUT_FILE).write_text("")
        return out

    monkeypatch.setattr(large_vocab, "build_large_vocab_teacher", build)
    path = large_vocab.large_vocab_teacher_path(seed=3)
    assert built == [path] and path.parent == tmp_path
    assert path.name.startswith("large-vocab-teacher-seed3-")
    assert large_vocab.large_vocab_teacher_path(seed=3) == path and len(built) == 1
    monkeypatch.setattr(large_vocab, "RECIPE_VERSION", large_vocab.RECIPE_VERSION + 1)
    assert large_vocab.large_vocab_teacher_path(seed=3) != path


def test_second_builder_waits_for_the_first_and_uses_its_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOGITCACHE_CACHE", str(tmp_path))
    building, release = threading.Event(), threading.Event()
    builds: list[Path] = []

    def build(out: Path) -> None:
        builds.append(out)
        building.set()
        release.wait(timeout=30)
        out.mkdir()
        (out / "done").write_text("")

    results: list[Path] = []

    def want() -> None:
        results.append(assets.cached_build("entry", "done", build))

    first = threading.Thread(target=want)
    first.start()
    assert building.wait(timeout=30)
    second = threading.Thread(target=want)
    second.start()
    time.sleep(0.2)  # lets the second reach the lock; were it not to wait, it would build too
    release.set()
    first.join()
    second.join()
    assert builds == [tmp_path / "entry"] and results == [tmp_path / "entry"] * 2
