"""Issue 13: stage 1 notices a changed corpus (never reusing stale lists or features); outputs honour the umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from processors.audio import load_audio
from processors.feature_store import feature_paths
from processors.preprocess import preprocess
from tests.reliability_kit import RATE, voice, write_config
from utils.config import load_config
from utils.io import atomic_write_text, load_npy, save_json, save_npy


def corpus(root: Path, names: list[str], seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        sf.write(root / name, voice(0.2 + 0.02 * i, seed=seed + i), RATE)
    return root


def run_stage1(tmp_path: Path, root: Path) -> tuple[dict[str, dict], dict[str, int]]:
    """Stage 1 in-process; returns entries by file name and the mtime of each feature file."""
    preprocess(load_config(write_config(tmp_path, corpus=root)), 1)
    data = tmp_path / "data" / "demo"
    entries = json.loads((data / "train.json").read_text()) + json.loads((data / "test.json").read_text())
    stamps = {p.name: p.stat().st_mtime_ns for p in data.glob("*/*.npy")}
    return {Path(e["Path"]).name: e for e in entries}, stamps


def features_match_sources(tmp_path: Path, entries: dict[str, dict]) -> bool:
    return all(np.array_equal(load_npy(feature_paths(tmp_path / "data", e)[1]), load_audio(e["Path"], RATE))
               for e in entries.values())


def test_unchanged_corpus_reuses_metadata_and_features(tmp_path, caplog):
    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav", "c.wav"])
    _entries, first = run_stage1(tmp_path, root)
    listing = (tmp_path / "data/demo/train.json").stat().st_mtime_ns
    caplog.clear()
    _entries, second = run_stage1(tmp_path, root)
    assert second == first and (tmp_path / "data/demo/train.json").stat().st_mtime_ns == listing
    assert "changed" not in caplog.text


@pytest.mark.parametrize("change", ["added", "removed", "rewritten", "renamed"])
def test_a_changed_corpus_is_rebuilt(tmp_path, caplog, change):
    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav", "c.wav"])
    run_stage1(tmp_path, root)
    if change == "added":
        corpus(root, ["d.wav"], seed=9)
    elif change == "removed":
        (root / "b.wav").unlink()
    elif change == "rewritten":  # same name and size, other audio: only its mtime and content differ
        sf.write(root / "b.wav", voice(0.22, seed=42), RATE)
    else:
        (root / "c.wav").rename(root / "e.wav")
    caplog.clear()
    entries, _stamps = run_stage1(tmp_path, root)
    assert sorted(entries) == sorted(p.name for p in root.iterdir())
    assert "the corpus changed since its metadata was written" in caplog.text
    assert features_match_sources(tmp_path, entries)


def test_another_dataset_path_with_the_same_names_rebuilds_every_feature(tmp_path, caplog):
    names = ["a.wav", "b.wav", "c.wav"]
    run_stage1(tmp_path, corpus(tmp_path / "one", names, seed=0))
    entries, _stamps = run_stage1(tmp_path, corpus(tmp_path / "two", names, seed=50))
    assert all(Path(e["Path"]).parent == tmp_path / "two" for e in entries.values())
    assert "dataset_path was" in caplog.text and features_match_sources(tmp_path, entries)


def test_a_damaged_fingerprint_rebuilds_instead_of_trusting_the_lists(tmp_path, caplog):
    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav"])
    run_stage1(tmp_path, root)
    (tmp_path / "data/demo/inputs.json").write_text("[broken")
    corpus(root, ["z.wav"], seed=7)
    entries, _stamps = run_stage1(tmp_path, root)
    assert sorted(entries) == ["a.wav", "b.wav", "z.wav"] and "rebuilding" in caplog.text


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        save_json(tmp_path / "b.json", {})
        save_npy(tmp_path / "c.npy", np.zeros(3))
    finally:
        os.umask(previous)
    for name in ("a.txt", "b.json", "c.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
