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
from utils.io import atomic_write_text, load_npy, npy_shape, save_json, save_npy


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


PLAIN_ARRAYS = [np.zeros(7, np.float32), np.zeros((3, 5), np.float32), np.asfortranarray(np.zeros((3, 5), np.float32)),
                np.zeros((3, 5), ">f4"), np.zeros((), np.int64), np.zeros((0, 4), np.float64), np.zeros(3, bool)]


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
@pytest.mark.parametrize("array", PLAIN_ARRAYS, ids=range(len(PLAIN_ARRAYS)))
def test_npy_headers_as_numpy_writes_them_are_parsed_directly_and_still_checked(tmp_path, monkeypatch, array, version):
    """Numpy's header parser made the rerun's "done" check seven times slower than two is_file calls."""
    path = tmp_path / "a.npy"
    with open(path, "wb") as handle:
        np.lib.format.write_array(handle, array, version=version)
    data = path.read_bytes()
    for name in ("read_array_header_1_0", "read_array_header_2_0"):
        monkeypatch.setattr(np.lib.format, name, lambda *_: pytest.fail("numpy's header parser used"))
    assert npy_shape(path) == (array.shape, array.dtype)
    for damaged in (data[:-1], data + b"\0") if array.nbytes else (data + b"\0",):
        path.write_bytes(damaged)
        assert npy_shape(path) is None


def test_an_unusual_npy_header_falls_back_to_numpys_parser(tmp_path):
    path = tmp_path / "a.npy"
    for header, expected in [("{'shape': (3,), 'fortran_order': False, 'descr': '<f4'}", ((3,), np.dtype("<f4"))),
                             ("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'x': 1}", None)]:
        head = header.encode().ljust(117) + b"\n"
        path.write_bytes(b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head + bytes(12))
        assert npy_shape(path) == expected
