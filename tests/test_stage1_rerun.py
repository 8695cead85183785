"""Stage 1 reruns after a hostile tester's changes: other mel settings, damaged features, a run killed half-way."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import soundfile as sf

from processors.datasets.custom import every_nth_test
from processors.feature_store import feature_paths
from processors.preprocess import extract_one, preprocess
from tests.corpora import ljspeech, pjs
from tests.reliability_kit import N_MEL, RATE, python_bin, voice, write_config
from utils.config import load_config
from utils.io import load_npy, regular_file_size


def corpus(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        sf.write(root / name, voice(0.2 + 0.02 * i, seed=i), RATE)
    return root


def stage1(tmp_path: Path, root: Path, **pre) -> list[dict]:
    """Stage 1 in-process with these preprocess settings; returns the entries of both splits."""
    preprocess(load_config(write_config(tmp_path, corpus=root, preprocess=pre)), 1)
    data = tmp_path / "data" / "demo"
    return json.loads((data / "train.json").read_text()) + json.loads((data / "test.json").read_text())


def stamps(tmp_path: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (tmp_path / "data" / "demo").glob("*/*.npy")}


@pytest.mark.parametrize(("setting", "value"), [("n_mel", 20), ("fmax", 3000)])
def test_other_mel_settings_remake_every_feature(tmp_path, caplog, setting, value):
    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav"])
    entries = stage1(tmp_path, root)
    before = stamps(tmp_path)
    caplog.clear()
    stage1(tmp_path, root, **{setting: value})
    after = stamps(tmp_path)
    assert set(after) == set(before) and all(after[p] != before[p] for p in before)
    assert f"{setting} " in caplog.text and "made anew" in caplog.text
    n_mel = value if setting == "n_mel" else N_MEL
    assert all(load_npy(feature_paths(tmp_path / "data", e)[0]).shape[0] == n_mel for e in entries)
    caplog.clear()
    stage1(tmp_path, root, **{setting: value})
    assert stamps(tmp_path) == after and "made anew" not in caplog.text


def test_fmax_null_and_the_nyquist_frequency_are_the_same_features(tmp_path, caplog):
    """librosa takes fmax null as sample_rate / 2: writing it out is no reason to remake or refuse the features,
    also where features.json was written with null (as stage 1 did before)."""
    from processors.feature_store import load_entries

    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav"])
    stage1(tmp_path, root, fmax=None)
    before = stamps(tmp_path)
    caplog.clear()
    stage1(tmp_path, root, fmax=RATE / 2)
    assert stamps(tmp_path) == before and "made anew" not in caplog.text
    record = tmp_path / "data" / "demo" / "features.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "fmax": None}))
    assert load_entries(load_config(write_config(tmp_path, corpus=root, preprocess={"fmax": RATE / 2})), "train")
    stage1(tmp_path, root, fmax=RATE / 2)
    assert stamps(tmp_path) == before and "made anew" not in caplog.text


@pytest.mark.parametrize("split", ["train", "valid"])
def test_later_stages_refuse_features_recorded_with_other_settings(tmp_path, split):
    """Training and dataset-mode vocoding read features only of their own settings: an fmax-only difference keeps
    every shape, and went unnoticed."""
    from processors.feature_store import load_entries
    from utils.config import ConfigError

    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav"])
    stage1(tmp_path, root, fmax=3000)
    assert load_entries(load_config(write_config(tmp_path, corpus=root, preprocess={"fmax": 3000})), split)
    other = load_config(write_config(tmp_path, corpus=root))
    with pytest.raises(ConfigError, match=r"data/demo/features.json: the features of 'demo' were made with fmax 3000"):
        load_entries(other, split)


@pytest.mark.parametrize(("made_with", "kept"),
                         [({}, True), ({"fmax": 3000}, False), ({"sample_rate": 16000, "hop_size": 128}, False)])
def test_features_from_before_the_settings_record_are_checked_not_trusted(tmp_path, caplog, made_with, kept):
    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav", "c.wav"])
    stage1(tmp_path, root, **made_with)
    (tmp_path / "data" / "demo" / "features.json").unlink()  # a processed folder from before the record existed
    before = stamps(tmp_path)
    caplog.clear()
    stage1(tmp_path, root)
    after = stamps(tmp_path)
    assert (after == before) == kept and ("made anew" in caplog.text) != kept
    assert all(after[p] != before[p] for p in before) or kept
    assert json.loads((tmp_path / "data" / "demo" / "features.json").read_text())["sample_rate"] == RATE


@pytest.mark.parametrize("damage", ["zero_bytes", "truncated", "not_npy"])
def test_damaged_feature_files_are_made_again(tmp_path, damage):
    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav"])
    entries = stage1(tmp_path, root)
    mel_path, audio_path = feature_paths(tmp_path / "data", entries[0])
    target = audio_path if damage == "zero_bytes" else mel_path
    data = target.read_bytes()
    target.write_bytes({"zero_bytes": b"", "truncated": data[: len(data) // 2], "not_npy": b"x" * len(data)}[damage])
    before = stamps(tmp_path)
    stage1(tmp_path, root)
    after = stamps(tmp_path)
    assert load_npy(mel_path).shape[0] == N_MEL and load_npy(audio_path).ndim == 1
    assert sorted(p for p in before if after[p] != before[p]) == sorted([str(mel_path), str(audio_path)])


def test_symlinked_speaker_folders_are_read_and_watched(tmp_path, caplog):
    root = corpus(tmp_path / "corpus", ["a.wav"])
    elsewhere = corpus(tmp_path / "elsewhere" / "spk2", ["b.wav"])
    (root / "spk2").symlink_to(elsewhere, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    assert sorted(Path(e["Path"]).name for e in stage1(tmp_path, root)) == ["a.wav", "b.wav"]
    sf.write(elsewhere / "b.wav", voice(0.3, seed=9), RATE)
    caplog.clear()
    entries = stage1(tmp_path, root)
    assert "the corpus changed" in caplog.text
    audio = load_npy(feature_paths(tmp_path / "data", next(e for e in entries if e["Path"].endswith("b.wav")))[1])
    assert len(audio) == int(0.3 * RATE)


def test_a_processed_dir_inside_the_corpus_does_not_change_it(tmp_path, caplog):
    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav"])
    cfg = load_config(write_config(tmp_path, corpus=root, preprocess={"processed_dir": str(root / "data")}))
    preprocess(cfg, 1)
    caplog.clear()
    preprocess(cfg, 1)
    assert (root / "data" / "demo" / "train.json").is_file() and "changed" not in caplog.text


def test_uids_longer_than_a_file_name_get_short_distinct_feature_files(tmp_path):
    deep = tmp_path / "corpus" / ("歌手" * 30) / ("曲名" * 30) / ("版本" * 30)
    corpus(deep, [f"{'录音' * 30}_{k}.wav" for k in range(2)])
    entries = stage1(tmp_path, tmp_path / "corpus")
    names = {feature_paths(tmp_path / "data", e)[0].name for e in entries}
    assert len(names) == 2 and all(len(n.encode()) <= 190 for n in names)
    assert all(load_npy(feature_paths(tmp_path / "data", e)[0]).shape[0] == N_MEL for e in entries)


def test_a_feature_file_that_cannot_be_written_is_a_skip_reason(tmp_path):
    source = corpus(tmp_path / "corpus", ["a.wav"]) / "a.wav"
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the features' folder should be")
    pre = dict(load_config(write_config(tmp_path)).preprocess)
    reason = extract_one((str(source), str(blocker / "m.npy"), str(blocker / "a.npy"), pre))
    assert reason is not None and reason.startswith(f"{source}: features not written (")


def test_metadata_of_a_run_killed_before_recording_its_inputs_is_rebuilt(tmp_path, caplog, monkeypatch):
    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav"])

    def killed(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr("processors.preprocess.write_fingerprint", killed)
    with pytest.raises(KeyboardInterrupt):
        stage1(tmp_path, root)
    assert (tmp_path / "data" / "demo" / "train.json").is_file()
    monkeypatch.undo()
    sf.write(root / "c.wav", voice(0.25, seed=5), RATE)
    caplog.clear()
    entries = stage1(tmp_path, root)
    assert sorted(Path(e["Path"]).name for e in entries) == ["a.wav", "b.wav", "c.wav"]
    assert "stopped before recording its inputs" in caplog.text and "reused as is" not in caplog.text


def die(_job: tuple) -> None:
    os._exit(9)  # what the out-of-memory killer does to a worker


def test_a_dead_extraction_worker_is_one_line(tmp_path, monkeypatch):
    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav", "c.wav"])
    monkeypatch.setattr("processors.preprocess.extract_one", die)
    with pytest.raises(ChildProcessError, match=r"^an extraction worker died .*fewer --num_workers$"):
        preprocess(load_config(write_config(tmp_path, corpus=root)), 2)


def test_default_workers_are_the_cpus_this_job_may_use_at_most_one_per_file(tmp_path, monkeypatch):
    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav", "c.wav"])
    asked = []
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    monkeypatch.setattr("processors.preprocess.feature_pool", lambda workers: asked.append(workers))
    preprocess(load_config(write_config(tmp_path, corpus=root)))
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    (root / "a.wav").unlink()  # two files to make, 8 CPUs
    for npy in (tmp_path / "data").rglob("*.npy"):
        npy.unlink()
    preprocess(load_config(write_config(tmp_path, corpus=root)))
    for npy in (tmp_path / "data").rglob("*.npy"):
        npy.unlink()
    preprocess(load_config(write_config(tmp_path, corpus=root)), 64)  # asked for: still no more than one a file
    assert asked == [2, 2, 2]


def test_a_dataset_whose_every_file_is_bad_fails_the_stage_after_the_healthy_ones(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("x.wav", "y.wav"):
        (bad / name).write_bytes(b"not audio")
    good = corpus(tmp_path / "good", ["a.wav"])
    config = write_config(tmp_path, corpus=bad)
    cfg = json.loads(config.read_text())
    cfg.update(dataset=["bad", "good"], use_custom_dataset=["bad", "good"], dataset_path={"bad": str(bad), "good": str(good)})
    config.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"^bad: every one of its 2 utterances was skipped; reasons in .*skipped\.txt$"):
        preprocess(load_config(config), 1)
    assert len(list((tmp_path / "data" / "good" / "mels").glob("*.npy"))) == 1


def test_dataset_path_may_start_with_a_tilde_and_a_missing_folder_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    corpus(tmp_path / "corpus", ["a.wav", "b.wav"])
    assert len(stage1(tmp_path, Path("~/corpus"))) == 2
    with pytest.raises(ValueError, match=r"nowhere: the folder of dataset 'demo' does not exist \(dataset_path\.demo\)$"):
        stage1(tmp_path, tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"a.wav: the folder of dataset 'demo' is not a folder \(dataset_path\.demo\)$"):
        stage1(tmp_path, tmp_path / "corpus" / "a.wav")
    monkeypatch.chdir(tmp_path)  # a relative path is read from the working folder (run.sh's: the toolkit's root)
    with pytest.raises(ValueError, match=rf"^elsewhere \(relative to the working folder: {tmp_path / 'elsewhere'}\): "):
        stage1(tmp_path, Path("elsewhere"))


def test_a_dangling_link_is_named_as_one(tmp_path):
    (tmp_path / "x.wav").symlink_to(tmp_path / "gone.wav")
    with pytest.raises(ValueError, match=r"x\.wav: a dangling link \(its target does not exist\)$"):
        regular_file_size(tmp_path / "x.wav")


@pytest.mark.parametrize("count", ["0", "-2"])
def test_num_workers_below_one_is_refused(tmp_path, count):
    result = python_bin("preprocess.py", "--config", str(write_config(tmp_path)), "--num_workers", count)
    assert result.returncode == 2 and f"--num_workers: must be at least 1, got {int(count)}" in result.stderr


@pytest.mark.parametrize("record", ["", "[1, 2]", "{}"])
def test_an_unreadable_settings_record_checks_the_features_instead_of_remaking_them(tmp_path, caplog, record):
    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav"])
    stage1(tmp_path, root)
    (tmp_path / "data" / "demo" / "features.json").write_text(record)
    before = stamps(tmp_path)
    caplog.clear()
    stage1(tmp_path, root)
    assert stamps(tmp_path) == before and "features.json: unreadable or incomplete" in caplog.text
    assert "None ->" not in caplog.text and "made anew" not in caplog.text


def test_an_empty_test_split_is_warned_with_the_rule(tmp_path, caplog):
    root = ljspeech(tmp_path / "lj")
    for wav in sorted((root / "wavs").glob("*.wav"))[19:]:
        wav.unlink()  # 19 clips: N // 20 is 0
    config = write_config(tmp_path, corpus=root)
    cfg = json.loads(config.read_text())
    cfg.update(dataset=["ljspeech"], use_custom_dataset=[], dataset_path={"ljspeech": str(root)})
    config.write_text(json.dumps(cfg))
    preprocess(load_config(config), 1)
    assert "ljspeech: the test split is empty (the test rule: the last 5% (N // 20) of the sorted listing" in caplog.text


def test_the_custom_split_is_linear_in_the_corpus_size():
    entries = [{"Uid": f"u{i}", "Path": f"/c/u{i}.wav", "Duration": 1.0} for i in range(30000)]
    start = time.perf_counter()
    train, test = every_nth_test(entries)
    assert time.perf_counter() - start < 0.5
    assert len(test) == 1500 and len(train) == 28500 and test[0] is entries[19]
    assert every_nth_test(entries[:3]) == (entries[:2], entries[2:3])


def test_clips_deleted_by_hand_are_cut_again(tmp_path, caplog):
    config = write_config(tmp_path)
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps({**cfg, "dataset": ["pjs"], "dataset_path": {"pjs": str(pjs(tmp_path / "pjs"))}}))
    preprocess(load_config(config), 1)
    clips = tmp_path / "data" / "pjs" / "clips"
    made = sorted(clips.glob("*.wav"))
    made[0].unlink()
    preprocess(load_config(config), 1)
    assert made[0].is_file() and "clips missing (1 clip" in caplog.text
    shutil.rmtree(clips)
    config.write_text(json.dumps({**json.loads(config.read_text()), "preprocess": {**cfg["preprocess"], "fmax": 3000}}))
    preprocess(load_config(config), 1)
    assert sorted(clips.glob("*.wav")) == made


def test_features_a_training_reads_are_not_remade_under_it_nor_read_while_stage_1_remakes_them(tmp_path):
    """Stage 1 with other settings deleted and remade every feature of a dataset that a running training (another
    process) was reading: it went on with the new features, or failed on a deleted one."""
    import fcntl

    from processors.feature_store import LOCK_FILE
    from tests.training_kit import trainer
    from utils.config import ConfigError

    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav", "c.wav"])
    stage1(tmp_path, root)
    before = stamps(tmp_path)
    lock = tmp_path / "data" / "demo" / LOCK_FILE
    with open(lock, "a+") as training:  # another process's shared hold: a second open conflicts as one would
        fcntl.flock(training, fcntl.LOCK_SH)
        with pytest.raises(ConfigError, match=r"data/demo: the features were made with other settings \(fmax .*\) "
                                              "and a training is reading them"):
            stage1(tmp_path, root, fmax=3000)
        assert stamps(tmp_path) == before  # nothing deleted
        stage1(tmp_path, root)  # the same settings: nothing to remake, so nothing to refuse
        assert stamps(tmp_path) == before
    with open(lock, "a+") as remaking:  # stage 1 remaking them, in another process
        fcntl.flock(remaking, fcntl.LOCK_EX)
        remaking.truncate(0)
        remaking.write("4242\n")
        remaking.flush()
        with pytest.raises(ConfigError, match=r"data/demo: stage 1 \(pid 4242\) is remaking these features"):
            trainer(write_config(tmp_path, corpus=root), "reader")
    assert not (tmp_path / "ckpts" / "reader").exists()  # the refused setup left nothing, and no lock held
    run = trainer(write_config(tmp_path, corpus=root, train={"max_steps": 1}), "reader")
    with open(lock, "a+") as other, pytest.raises(BlockingIOError):  # the training holds it, shared, until it ends
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    run.train()
    stage1(tmp_path, root, fmax=3000)  # the training has ended: remade
    assert all(stamps(tmp_path)[p] != before[p] for p in before)


def test_features_in_a_read_only_store_are_read_unguarded(tmp_path, monkeypatch, caplog):
    """A training on features shared read-only (another user's store) cannot make or open its lock file for
    writing: it trains, with a warning, rather than stopping."""
    import errno

    from processors.feature_store import hold_features, release_features
    from utils import file_lock

    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav"])
    stage1(tmp_path, root)
    pre = load_config(write_config(tmp_path, corpus=root)).preprocess

    def read_only(path: Path, exclusive: bool) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(file_lock, "opened", read_only)
    hold_features(pre, ["demo"])
    assert "demo/.features.lock: cannot lock (Read-only file system)" in caplog.text
    release_features(pre, ["demo"])


def test_a_remake_that_fails_half_way_lets_go_of_the_features(tmp_path, monkeypatch):
    """Stage 1 that failed (a full disk, Ctrl-C in a notebook) between locking a dataset to remake it and recording
    the new settings kept the lock for the life of the process: every training elsewhere was refused, and a later
    stage 1 in the same process, taking the lock for its own, never let go of it either."""
    import errno

    from processors import feature_store
    from utils import file_lock

    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav"])
    stage1(tmp_path, root)

    def full(path: Path, data: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(feature_store, "save_json", full)
        with pytest.raises(OSError, match="No space left"):
            stage1(tmp_path, root, fmax=3000)
    assert not file_lock.HELD
    stage1(tmp_path, root, fmax=3000)
    assert not file_lock.HELD


def test_features_of_rewritten_sources_are_not_remade_under_a_training(tmp_path):
    """Stage 1 with the same settings after a corpus file was rewritten deleted that file's features under a running
    training (another process), which then failed on the deleted file."""
    import fcntl

    from processors.feature_store import LOCK_FILE
    from utils.config import ConfigError

    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav", "c.wav"])
    stage1(tmp_path, root)
    before, data = stamps(tmp_path), tmp_path / "data" / "demo"
    metadata = (data / "train.json").read_text()
    sf.write(root / "a.wav", voice(0.5, seed=9), RATE)
    with open(data / LOCK_FILE, "a+") as training:
        fcntl.flock(training, fcntl.LOCK_SH)
        with pytest.raises(ConfigError, match=r"data/demo: the corpus changed \(1 source rewritten\) and a training is "
                                              "reading them"):
            stage1(tmp_path, root)
        assert stamps(tmp_path) == before and (data / "train.json").read_text() == metadata
    stage1(tmp_path, root)  # the training has ended
    after = stamps(tmp_path)
    assert set(after) == set(before) and sum(after[p] != before[p] for p in before) == 2


def test_a_stage_1_refused_by_another_stage_1_says_so(tmp_path):
    """Two stage 1 runs with other settings at once: the second was told that a training was reading the features."""
    import fcntl

    from processors.feature_store import LOCK_FILE
    from utils.config import ConfigError

    root = corpus(tmp_path / "corpus", ["a.wav", "b.wav"])
    stage1(tmp_path, root)
    lock = tmp_path / "data" / "demo" / LOCK_FILE
    with open(lock, "a+") as remaking:  # stage 1 remaking them, in another process
        fcntl.flock(remaking, fcntl.LOCK_EX)
        remaking.write("4242\n")
        remaking.flush()
        with pytest.raises(ConfigError, match=r"fmax .*\), and another stage 1 \(pid 4242\) is remaking them"):
            stage1(tmp_path, root, fmax=3000)
    with open(lock, "a+") as training:  # the pid an earlier stage 1 left in the file is no training's
        fcntl.flock(training, fcntl.LOCK_SH)
        with pytest.raises(ConfigError, match=r"fmax .*\) and a training is reading them"):
            stage1(tmp_path, root, fmax=3000)
