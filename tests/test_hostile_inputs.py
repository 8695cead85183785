"""Issue 13, inputs nobody planned for: every input gets its own output or a listed reason, special files
never block, headers are checked against the size on disk, and a run that did nothing fails.

Stage 1 and stage 3 run in-process on tiny folders; a watchdog alarm turns a hang into a failure.
"""

from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from models.vocoders.diffusion.inference_modes import InputError, run_inference
from processors.audio import AudioError, load_audio
from processors.feature_store import feature_paths
from processors.preprocess import distinct_uids, preprocess
from tests.reliability_kit import HOP, N_MEL, RATE, make_experiment, python_bin, voice, write_config
from utils.config import load_config
from utils.io import load_npy, unique_names


@contextmanager
def no_hang(seconds: int = 90):
    """Fail instead of blocking forever (a FIFO opened for reading waits for a writer)."""
    def expire(*_args):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@given(st.lists(st.text(alphabet="aAbB./_ \\", min_size=0, max_size=4), max_size=12))
@settings(max_examples=200, deadline=None)
def test_unique_names_never_collide_even_ignoring_case(stems):
    wanted = [(stem, f"{i}|{stem}") for i, stem in enumerate(stems)]
    names = unique_names(wanted)
    assert len({n.casefold() for n in names}) == len(names)
    assert all("/" not in n and "\\" not in n and not n.startswith(".") and n for n in names)
    assert names == unique_names(wanted)  # stable: a resumed run writes the same names


def test_first_claimant_keeps_its_name_and_others_get_a_suffix():
    names = unique_names([("a", "a.wav"), ("a", "a.flac"), ("sub/b", "sub/b.wav"), ("sub_b", "sub_b.wav"), ("c", "c")])
    assert names[0] == "a" and names[2] == "sub_b" and names[4] == "c"
    assert names[1].startswith("a-") and names[3].startswith("sub_b-")


def test_distinct_uids_renames_only_collisions():
    entries = [{"Uid": u, "Path": f"/c/{i}"} for i, u in enumerate(["x/y", "x_y", "X_Y", ".z", "_z", "../up", "solo"])]
    distinct_uids(entries)
    paths = [feature_paths("/p", {"Dataset": "d", "Uid": e["Uid"]})[0].name.casefold() for e in entries]
    assert len(set(paths)) == len(paths)
    assert entries[0]["Uid"] == "x/y" and entries[5]["Uid"] == "../up" and entries[6]["Uid"] == "solo"


def special_files(folder: Path, suffix: str) -> list[Path]:
    """A FIFO, and a symlink to a character device, both named like inputs."""
    fifo = folder / f"fifo{suffix}"
    os.mkfifo(fifo)
    device = folder / f"device{suffix}"
    device.symlink_to("/dev/zero")
    return [fifo, device]


def test_special_files_are_refused_without_opening(tmp_path):
    with no_hang(20):
        for path in special_files(tmp_path, ".wav"):
            with pytest.raises(AudioError, match=r"not a regular file \(a (FIFO|character device)\)"):
                load_audio(path, RATE)
        (tmp_path / "npy").mkdir()
        for path in special_files(tmp_path / "npy", ".npy"):
            with pytest.raises(ValueError, match="not a regular file"):
                load_npy(path)


@pytest.mark.parametrize(("claim", "data"), [((2**40, 2**20), 64), ((3, 4), 47), ((3, 4), 49), ((0,), 8)])
def test_npy_header_must_match_the_size_on_disk(tmp_path, claim, data):
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1,), np.float32))
    header["shape"] = claim
    path = tmp_path / "lying.npy"
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(b"\0" * data)
    with pytest.raises(ValueError, match=r"lying\.npy: .*header claims shape"):
        load_npy(path)


def mel(frames: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-8, -1, (N_MEL, frames)).astype(np.float32)


@pytest.fixture(scope="module")
def vocoder(tmp_path_factory):
    from models.vocoders.diffusion.diffusion_vocoder_inference import vocoder_from_experiment

    root = tmp_path_factory.mktemp("expt")
    return vocoder_from_experiment(make_experiment(root, write_config(root)))


def test_stage3_audio_inputs_that_sanitise_alike_each_get_their_own_wav(tmp_path, vocoder, caplog):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    sources = {"a.wav": 1, "a.flac": 2, "A.wav": 3, "sub/b.wav": 4, "sub_b.wav": 5, " c.wav": 6, "c.wav": 7}
    for name, seed in sources.items():
        sf.write(folder / name, voice(0.05 + 0.01 * seed, seed=seed), RATE)
    with no_hang():
        special_files(folder, ".wav")
        written = run_inference(vocoder, "infer_from_audio", tmp_path / "out", audio_dir=str(folder))
    wavs = sorted((tmp_path / "out" / "pred").glob("*.wav"))
    assert written == len(sources) == len(wavs)
    lengths = sorted(len(sf.read(w)[0]) for w in wavs)
    want = sorted((round(len(sf.read(folder / n)[0])) // HOP) * HOP for n in sources)
    assert lengths == want  # each input's own audio, none overwritten by another
    skipped = (tmp_path / "out" / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 2 and all("not a regular file" in line for line in skipped)
    assert "collides with another input" in caplog.text


def test_stage3_lying_or_special_mels_are_listed_and_the_good_ones_vocoded(tmp_path, vocoder):
    folder = tmp_path / "mels"
    folder.mkdir()
    for i in range(2):
        np.save(folder / f"good{i}.npy", mel(seed=i))
    np.save(folder / ".good.npy", mel(seed=5))
    np.save(folder / "_good.npy", mel(seed=6))  # sanitises like .good: still its own wav
    header = np.lib.format.header_data_from_array_1_0(mel())
    header["shape"] = (N_MEL, 2**40)
    with open(folder / "huge.npy", "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(b"\0" * 1700)
    np.save(folder / "cut.npy", mel())
    (folder / "cut.npy").write_bytes((folder / "cut.npy").read_bytes()[:-100])
    with no_hang():
        special_files(folder, ".npy")
        written = run_inference(vocoder, "infer_from_feature", tmp_path / "out", feature_dir=str(folder))
    assert written == 4 and len(list((tmp_path / "out" / "pred").glob("*.wav"))) == 4
    skipped = (tmp_path / "out" / "skipped.txt").read_text().splitlines()
    assert sorted(Path(line.split(":")[0]).name for line in skipped) == ["cut.npy", "device.npy", "fifo.npy", "huge.npy"]


def test_stage3_where_every_input_was_skipped_fails(tmp_path, vocoder):
    folder = tmp_path / "mels"
    folder.mkdir()
    (folder / "empty.npy").write_bytes(b"")
    np.save(folder / "wrong.npy", np.zeros((7, 3), np.float32))
    with pytest.raises(InputError, match=r"nothing was vocoded, 2 inputs skipped; reasons in .*skipped.txt"):
        run_inference(vocoder, "infer_from_feature", tmp_path / "out", feature_dir=str(folder))
    assert len((tmp_path / "out" / "skipped.txt").read_text().splitlines()) == 2


def test_stage3_cli_all_skipped_exits_non_zero_with_one_line(tmp_path):
    config = write_config(tmp_path)
    expt = make_experiment(tmp_path, config)
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "noise.wav").write_bytes(np.random.default_rng(1).bytes(3000))
    result = python_bin("inference.py", "--infer_mode", "infer_from_audio", "--infer_expt_dir", str(expt),
                        "--output_dir", str(tmp_path / "out"), "--audio_folder", str(tmp_path / "audio"))
    assert result.returncode == 1 and "nothing was vocoded" in result.stderr and "RTF" not in result.stderr
    assert "Traceback" not in result.stderr


def corpus_with_every_kind_of_input(root: Path) -> dict[str, int]:
    """Good files whose Uids collide in several ways, plus files that must be skipped and listed."""
    (root / "sub").mkdir(parents=True)
    good = {"a.wav": 1, "a.flac": 2, "sub/b.wav": 3, "sub_b.wav": 4, "x.wav": 5}
    for name, seed in good.items():
        sf.write(root / name, voice(0.2 + 0.05 * seed, seed=seed), RATE)
    (root / "zero.wav").write_bytes(b"")
    (root / "garbage.wav").write_bytes(np.random.default_rng(7).bytes(4000))
    full = (root / "x.wav").read_bytes()
    (root / "header_only.wav").write_bytes(full[:44])
    (root / "half.flac").write_bytes((root / "a.flac").read_bytes()[:200])
    special_files(root, ".wav")
    return good


def test_stage1_gives_every_input_its_own_features_or_lists_it(tmp_path, caplog):
    good = corpus_with_every_kind_of_input(tmp_path / "corpus")
    cfg = load_config(write_config(tmp_path))
    with no_hang():
        preprocess(cfg, 1)
    data = tmp_path / "data" / "demo"
    entries = json.loads((data / "train.json").read_text()) + json.loads((data / "test.json").read_text())
    by_path = {Path(e["Path"]).relative_to(tmp_path / "corpus").as_posix(): e for e in entries}
    mels = set()
    for name in good:
        mel_path, audio_path = feature_paths(tmp_path / "data", by_path[name])
        assert np.allclose(load_npy(audio_path), load_audio(tmp_path / "corpus" / name, RATE)), name
        mels.add(mel_path)
    assert len(mels) == len(good)
    listed = (data / "skipped.txt").read_text().splitlines()
    dropped = sorted(Path(line.split(": ")[0]).name for line in listed)
    assert dropped == ["device.wav", "fifo.wav", "garbage.wav", "half.flac", "header_only.wav", "zero.wav"]
    assert all(f"skipped {line}" in caplog.text for line in listed)


def test_stage1_where_every_input_was_skipped_exits_non_zero(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "zero.wav").write_bytes(b"")
    (corpus / "noise.wav").write_bytes(np.random.default_rng(3).bytes(2048))
    result = python_bin("preprocess.py", "--config", str(write_config(tmp_path)), "--num_workers", "1")
    assert result.returncode == 1 and "every one of its 2 utterances was skipped" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) >= 1


def test_ljspeech_lists_a_zero_length_clip_instead_of_dropping_it(tmp_path):
    from processors.datasets.ljspeech import parse

    wavs = tmp_path / "LJSpeech-1.1" / "wavs"
    wavs.mkdir(parents=True)
    for i in range(3):
        sf.write(wavs / f"LJ001-000{i}.wav", voice(0.2, seed=i), 22050)
    (wavs / "LJ001-0009.wav").write_bytes(b"")
    train, test = parse(tmp_path, "ljspeech", tmp_path / "work")
    assert "LJ001-0009" in {e["Uid"] for e in train + test}  # stage 1 then skips it with its reason


def test_an_npz_archive_named_npy_is_refused_by_name(tmp_path):
    np.savez(tmp_path / "bundle.npz", mel=mel())
    (tmp_path / "bundle.npz").rename(tmp_path / "bundle.npy")
    with pytest.raises(ValueError, match=r"bundle\.npy: .*an \.npz archive"):
        load_npy(tmp_path / "bundle.npy")


def test_files_a_corpus_parser_leaves_out_are_listed_on_every_run(tmp_path, caplog):
    from tests.corpora import opensinger
    from tests.test_datasets import config

    root = tmp_path / "opensinger"
    root.mkdir()
    cfg = config(tmp_path / "data", {"opensinger": opensinger(root)})
    for _run in range(2):  # the second run reuses the metadata: the list must survive it
        preprocess(cfg, 1)
        listed = (tmp_path / "data/opensinger/skipped.txt").read_text(encoding="utf-8").splitlines()
        assert listed == [f"{root}/WomanRaw/41_long song/41_long song_0.wav: 30.5 s is over 30 s"]
    assert f"left out {listed[0]}" in caplog.text
