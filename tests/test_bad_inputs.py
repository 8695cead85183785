"""The bad-input battery (issue 8): each case is skipped or accepted with one line naming the file, and the
rest of the batch finishes. Stage 1 and stage 3 run once each through their bins over a folder holding every
case; the tests below read the outcome. Config errors go through run.sh. About 25 s on two busy cores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from processors.feature_store import feature_paths
from processors.preprocess import preprocess
from tests.reliability_kit import (
    BAD_AUDIO,
    BAD_MELS,
    GOOD_AUDIO,
    GOOD_MELS,
    HOP,
    N_MEL,
    RATE,
    RUN_SH,
    make_experiment,
    python_bin,
    run_cmd,
    write_audio_battery,
    write_config,
    write_mel_battery,
)
from utils.config import load_config
from utils.io import load_json, load_npy


def uid(name: str) -> str:
    return Path(name).stem  # files at the top of a custom corpus: Uid = file stem


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """Stage 1 over a custom corpus holding every audio case (plus two plain files)."""
    root = tmp_path_factory.mktemp("stage1")
    names = write_audio_battery(root / "corpus")
    write_audio_battery(root / "corpus" / "spk1")  # a second speaker, so the split has material
    config = write_config(root)
    result = python_bin("preprocess.py", "--config", str(config), "--num_workers", "1")
    return root, names, result


def test_stage1_finishes_despite_bad_files(stage1):
    _root, _names, result = stage1
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", sorted(BAD_AUDIO))
def test_stage1_bad_file_is_skipped_and_listed(stage1, case):
    root, names, result = stage1
    skipped = (root / "data/demo/skipped.txt").read_text(encoding="utf-8").splitlines()
    line = next(s for s in skipped if s.startswith(str(root / "corpus" / names[case]) + ":"))
    assert BAD_AUDIO[case] in line
    assert f"skipped {line}" in result.stderr  # the same one line is logged
    mel, audio = feature_paths(root / "data", {"Dataset": "demo", "Uid": uid(names[case])})
    assert not mel.exists() and not audio.exists()


@pytest.mark.parametrize("case", GOOD_AUDIO)
def test_stage1_odd_but_valid_file_is_processed(stage1, case):
    root, names, _result = stage1
    mel_path, audio_path = feature_paths(root / "data", {"Dataset": "demo", "Uid": uid(names[case])})
    mel, audio = load_npy(mel_path), load_npy(audio_path)
    source, rate = sf.read(root / "corpus" / names[case], dtype="float32", always_2d=True)
    assert audio.dtype == np.float32 and mel.shape == (N_MEL, len(audio) // HOP)
    assert abs(len(audio) - len(source) * RATE / rate) <= 1  # resampled to the config's rate
    assert np.isfinite(mel).all() and np.abs(audio).max() <= 1.0
    if case in ("pcm8", "pcm24", "float32", "stereo"):
        expected = source.mean(axis=1)
        tolerance = 0.02 if case == "pcm8" else 1e-3
        assert np.abs(audio - expected).max() < tolerance


def test_stage1_peak_above_one_warns_with_file_and_is_scaled(stage1):
    root, names, result = stage1
    warned = [line for line in result.stderr.splitlines() if "above 1.0" in line]
    assert any(str(root / "corpus" / names["peak"]) in line for line in warned)
    audio = load_npy(feature_paths(root / "data", {"Dataset": "demo", "Uid": uid(names["peak"])})[1])
    assert 0.99 < np.abs(audio).max() <= 1.0


def test_stage1_uids_stay_inside_the_feature_folders(stage1):
    root, _names, _result = stage1
    data = (root / "data" / "demo").resolve()
    entries = load_json(data / "train.json") + load_json(data / "test.json")
    for entry in entries:
        for path in feature_paths(root / "data", entry):
            assert path.resolve().parent.parent == data
    escaping = {"Dataset": "../../demo", "Uid": "../../../etc/x"}
    for path in feature_paths(root / "data", escaping):
        assert (root / "data").resolve() in path.resolve().parents


def test_stage1_escaping_uid_in_metadata_is_written_inside(tmp_path):
    """Metadata from another tool (reused by stage 1) whose Uid tries to climb out of processed_dir."""
    corpus = tmp_path / "corpus"
    names = write_audio_battery(corpus)
    entry = {"Dataset": "demo", "Uid": "../../escaped", "Path": str(corpus / names["space"]), "Duration": 0.3,
             "Singer": "s", "index": 0}
    for split in ("train.json", "test.json"):
        (tmp_path / "data/demo").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data/demo" / split).write_text(json.dumps([entry]), encoding="utf-8")
    preprocess(load_config(write_config(tmp_path)), num_workers=1)
    assert not list(tmp_path.rglob("escaped.npy"))
    mel, _audio = feature_paths(tmp_path / "data", entry)
    assert mel.is_file() and mel.parent == tmp_path / "data/demo/mels"


# ----- stage 3 ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage3")
    return root, make_experiment(root, write_config(root, inference={"batch_size": 4}))


@pytest.fixture(scope="module")
def from_audio(experiment):
    root, expt = experiment
    names = write_audio_battery(root / "audio")
    out = root / "out_audio"
    result = python_bin("inference.py", "--infer_mode", "infer_from_audio", "--infer_expt_dir", str(expt),
                        "--audio_folder", str(root / "audio"), "--output_dir", str(out))
    return root, names, out, result


@pytest.fixture(scope="module")
def from_feature(experiment):
    root, expt = experiment
    marker = root / "payload-ran"
    names = write_mel_battery(root / "mels", marker)
    out = root / "out_feature"
    result = python_bin("inference.py", "--infer_mode", "infer_from_feature", "--infer_expt_dir", str(expt),
                        "--feature_folder", str(root / "mels"), "--output_dir", str(out))
    return root, names, out, result, marker


def test_stage3_audio_batch_finishes(from_audio):
    _root, _names, out, result = from_audio
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert len(list((out / "pred").glob("*.wav"))) == len(GOOD_AUDIO)


@pytest.mark.parametrize("case", sorted(BAD_AUDIO))
def test_stage3_bad_audio_is_skipped_and_listed(from_audio, case):
    root, names, out, result = from_audio
    skipped = (out / "skipped.txt").read_text(encoding="utf-8").splitlines()
    line = next(s for s in skipped if s.startswith(str(root / "audio" / names[case]) + ":"))
    assert BAD_AUDIO[case] in line and f"skipped {line}" in result.stderr
    assert not (out / "pred" / f"{uid(names[case])}.wav").exists()


@pytest.mark.parametrize("case", GOOD_AUDIO)
def test_stage3_odd_but_valid_audio_is_vocoded(from_audio, case):
    root, names, out, _result = from_audio
    pred, rate = sf.read(out / "pred" / f"{uid(names[case])}.wav")
    source, source_rate = sf.read(root / "audio" / names[case])
    assert rate == RATE and len(pred) == (round(len(source) * RATE / source_rate) // HOP) * HOP
    if case == "peak":
        assert any("above 1.0" in line and names[case] in line for line in from_audio[3].stderr.splitlines())


@pytest.mark.parametrize("case", sorted(BAD_MELS))
def test_stage3_bad_mel_is_skipped_and_listed(from_feature, case):
    root, names, out, result, marker = from_feature
    assert result.returncode == 0, result.stderr
    skipped = (out / "skipped.txt").read_text(encoding="utf-8").splitlines()
    line = next(s for s in skipped if s.startswith(str(root / "mels" / names[case]) + ":"))
    assert BAD_MELS[case] in line and f"skipped {line}" in result.stderr
    assert not marker.exists(), "the object array was unpickled"


@pytest.mark.parametrize("case", GOOD_MELS)
def test_stage3_good_or_transposed_mel_is_vocoded(from_feature, case):
    root, names, out, result, _marker = from_feature
    frames = np.load(root / "mels" / names[case]).shape
    pred, _rate = sf.read(out / "pred" / f"{uid(names[case])}.wav")
    assert len(pred) == (14 if case == "transposed" else 12) * HOP, frames
    if case == "transposed":
        assert any("transposed" in line and names[case] in line for line in result.stderr.splitlines())


def test_stage3_escaping_uid_is_sanitised(tmp_path, experiment):
    """infer_from_dataset with metadata whose Uid is `../x`: the wav lands inside the output folder."""
    _root, expt = experiment
    from models.vocoders.diffusion.diffusion_vocoder_inference import vocoder_from_experiment
    from models.vocoders.diffusion.inference_modes import run_inference
    from utils.io import safe_name, save_npy

    vocoder = vocoder_from_experiment(expt)
    vocoder.cfg.preprocess.processed_dir = str(tmp_path / "data")
    entry = {"Dataset": "demo", "Uid": "../x", "Path": "-", "Duration": 0.1, "Singer": "s", "index": 0}
    (tmp_path / "data/demo").mkdir(parents=True)
    (tmp_path / "data/demo/test.json").write_text(json.dumps([entry]), encoding="utf-8")
    mel_path, audio_path = feature_paths(tmp_path / "data", entry)
    save_npy(mel_path, np.full((N_MEL, 8), -5.0, np.float32))
    save_npy(audio_path, np.zeros(8 * HOP, np.float32))
    out = tmp_path / "out"
    assert run_inference(vocoder, "infer_from_dataset", out, ["demo"]) == 1
    assert safe_name("../x") == "__x" and (out / "pred" / "__x.wav").is_file()
    assert not (tmp_path / "x.wav").exists() and not (out / "x.wav").exists()


# ----- config errors through run.sh ------------------------------------------------------------------------

def write(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def run_sh(*args: str) -> tuple[int, str]:
    result = run_cmd(["bash", str(RUN_SH), *args], timeout=60)
    return result.returncode, result.stderr


CONFIG_CASES = {  # name -> (stage, overrides of the tmp config, words the one line must hold)
    "unknown_generator": ("2", {"model": {"generator": "hifigan"}}, ["'model.generator'", "hifigan", "diffwave"]),
    "string_batch_size": ("2", {"train": {"batch_size": "16"}}, ["'train.batch_size'", "must be int", "'16'"]),
    "string_hop_size": ("1", {"preprocess": {"hop_size": "256"}}, ["'preprocess.hop_size'", "must be int"]),
    "string_lr": ("2", {"train": {"adamw": {"lr": "1e-3"}}}, ["'train.adamw.lr'", "must be int or float"]),
    "bool_as_number": ("2", {"train": {"batch_size": True}}, ["'train.batch_size'", "got bool"]),
    "section_not_object": ("1", {"preprocess": "data"}, ["'preprocess' must be an object"]),
    "missing_base": ("1", {"base_config": "nowhere/missing.json"}, ["base_config 'nowhere/missing.json' does not exist"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_error_is_one_line_naming_key_and_file(tmp_path, case):
    stage, overrides, words = CONFIG_CASES[case]
    config = write_config(tmp_path)
    cfg = json.loads(config.read_text())
    for key, value in overrides.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    write(config, cfg)
    code, stderr = run_sh("--stage", stage, "--name", "x", "--config", str(config))
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1, stderr
    assert lines[0].startswith(f"error: {config}:") and all(w in lines[0] for w in words), lines[0]


def test_missing_required_key_names_it(tmp_path):
    config = write(tmp_path / "bare.json", {"dataset": ["demo"], "dataset_path": {"demo": str(tmp_path)},
                                            "preprocess": {"sample_rate": 16000}})
    code, stderr = run_sh("--stage", "1", "--config", str(config))
    expected = f"error: {config}: missing required key 'preprocess.processed_dir' (needed by preprocess)"
    assert code != 0 and stderr.strip() == expected


def test_key_set_in_a_parent_is_blamed_on_the_parent(tmp_path):
    parent = write_config(tmp_path, train={"batch_size": "eight"})
    child = write(tmp_path / "child.json", {"base_config": str(parent), "train": {"max_steps": 3}})
    code, stderr = run_sh("--stage", "2", "--name", "x", "--config", str(child))
    assert code != 0 and stderr.startswith(f"error: {parent}: key 'train.batch_size'"), stderr


def test_base_config_loop_is_one_line(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write(a, {"base_config": str(b)})
    write(b, {"base_config": str(a)})
    code, stderr = run_sh("--stage", "1", "--config", str(a))
    assert code != 0 and len(stderr.strip().splitlines()) == 1 and "base_config loops" in stderr and str(a) in stderr


def test_debug_log_level_shows_the_traceback(tmp_path):
    config = write_config(tmp_path, train={"batch_size": "16"})
    code, stderr = run_sh("--stage", "2", "--name", "x", "--config", str(config), "--log_level", "debug")
    assert code != 0 and "Traceback" in stderr and "ConfigError" in stderr


@pytest.mark.parametrize("args, message", [
    # a value on an on/off flag turned it on: --infer_raw_weights=false used the raw weights
    (["-s", "3", "--infer_raw_weights=false"],
     "--infer_raw_weights takes no value (given '--infer_raw_weights=false'): leave it out to turn it off"),
    (["-s", "4", "--plot=no"], "--plot takes no value (given '--plot=no'): leave it out to turn it off"),
    # went on to an argparse usage block from check_config.py
    (["-s", "1", "--log_level", "verbose"], "--log_level must be debug, info, warning or error, got 'verbose'"),
    # an empty value fell back to a default silently; of two values only the last was checked
    (["-s", "4", "--infer_output_dir="], "--infer_output_dir needs a value (given empty)"),
    (["-s", "4", "--baseline", "foo", "--baseline", "griffinlim"], "--baseline is given twice"),
    # stage 4 scores with the experiment's own mel: a --config there was silently ignored
    (["-s", "4", "--config", "x.json"], "--config does not apply to stage 4 (it is for stage 1 or 2 or 3)"),
])
def test_run_sh_flag_values_it_cannot_use_are_one_line(args, message):
    code, stderr = run_sh(*args)
    assert code == 2 and stderr.strip().splitlines() == [f"run.sh: {message}"]


def test_unknown_infer_mode_is_one_line(tmp_path, experiment):
    _root, expt = experiment
    code, stderr = run_sh("--stage", "3", "--config", str(write_config(tmp_path)), "--infer_mode", "infer_from_moon",
                          "--infer_expt_dir", str(expt))
    assert code != 0 and stderr.strip() == (
        "run.sh: unknown --infer_mode 'infer_from_moon': use infer_from_dataset, infer_from_feature or infer_from_audio")
    direct = run_cmd([sys.executable, "bins/vocoder/inference.py", "--infer_mode", "moon", "--infer_expt_dir", str(expt),
                      "--output_dir", str(tmp_path)])
    assert direct.returncode == 2 and "invalid choice: 'moon'" in direct.stderr and "Traceback" not in direct.stderr


@pytest.mark.parametrize("flag, value, message", [("--infer_batch_size", "0", "--infer_batch_size 0: must be at least 1"),
                                                   ("--device", "meta", "device 'meta': synthesis runs on cpu or cuda only")])
def test_stage3_flag_it_cannot_use_is_one_line(tmp_path, experiment, flag, value, message):
    _root, expt = experiment
    result = python_bin("inference.py", "--infer_mode", "infer_from_audio", "--infer_expt_dir", str(expt),
                        "--audio_folder", str(tmp_path), "--output_dir", str(tmp_path / "out"), flag, value)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == f"error: {message}", result.stderr
    assert "Traceback" not in result.stderr


def test_one_mel_file_given_as_the_feature_folder_is_called_a_file(tmp_path, experiment):
    """It said "no mel files (expected good.npy/mels/*.npy)"."""
    _root, expt = experiment
    mel = tmp_path / "good.npy"
    np.save(mel, np.zeros((N_MEL, 12), np.float32))
    result = python_bin("inference.py", "--infer_mode", "infer_from_feature", "--infer_expt_dir", str(expt),
                        "--feature_folder", str(mel), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        f"error: {mel}: a file; vocode a folder of .npy mels (put this one in a folder of its own)"), result.stderr


def test_stage3_checks_the_experiment_config(tmp_path, experiment):
    _root, expt = experiment
    broken = tmp_path / "expt"
    broken.mkdir()
    args = json.loads((expt / "args.json").read_text())
    args["inference"]["sampler"] = "turbo"
    write(broken / "args.json", args)
    result = python_bin("inference.py", "--infer_mode", "infer_from_audio", "--infer_expt_dir", str(broken),
                        "--audio_folder", str(tmp_path), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 1 and result.stderr.strip() == (
        f"error: {broken / 'args.json'}: key 'inference.sampler' is 'turbo': choose one of fast, full, ddim, searched")


def test_a_bad_feature_file_met_by_a_loader_worker_is_still_one_line(monkeypatch, capsys):
    """Stage 2 reads crops in DataLoader workers (num_worker -1: up to 4), which wrap an error in the worker's
    traceback; the entry point prints the worker's own one line, naming the file."""
    import argparse

    from torch._utils import ExceptionWrapper

    from utils.cli import add_common_args, run
    from utils.config import ConfigError

    message = "/x/mels/u.npy: not a plain numeric .npy array (empty file)"
    for kind in (ValueError, ConfigError):  # a builtin, and one whose traceback line names its module
        try:
            raise kind(message)
        except kind:
            wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
        parser = argparse.ArgumentParser()
        add_common_args(parser, config_required=False)
        monkeypatch.setattr(sys, "argv", ["train"])
        with pytest.raises(SystemExit):
            run(lambda args, wrapped=wrapped: wrapped.reraise(), parser)
        assert capsys.readouterr().err == f"error: {message}\n"


def test_running_out_of_gpu_memory_is_one_line_that_says_what_to_lower(monkeypatch, capsys):
    import argparse

    from utils.cli import add_common_args, run

    report = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 7.79 GiB of which 1.02 "
              "GiB is free. Of the allocated memory 5.90 GiB is allocated by PyTorch, and 90.10 MiB is reserved by "
              "PyTorch but unallocated. If reserved but unallocated memory is large try setting "
              "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")

    def main(args: argparse.Namespace) -> None:
        raise torch.cuda.OutOfMemoryError(report)

    parser = argparse.ArgumentParser()
    add_common_args(parser, config_required=False)
    monkeypatch.setattr(sys, "argv", ["train"])
    with pytest.raises(SystemExit) as stop:
        run(main, parser)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1, err
    assert err.startswith("error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has "
                          "a total capacity of 7.79 GiB of which 1.02 GiB is free); lower train.batch_size"), err


def test_an_error_every_process_raised_is_said_once_and_one_of_its_own_names_its_process(monkeypatch):
    """Stage 2's processes each printed the error they all met (a damaged checkpoint, a refused resume): the user read
    it once a process. The main process says it; another says only an error of its own, naming itself."""
    from datetime import timedelta

    from utils.cli import whose

    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=10))
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.setenv("RANK", "1")
    assert whose("refused", wait_s=0.2) == "process 1"  # no word from the main process in time: its own, named
    monkeypatch.setenv("RANK", "0")
    assert whose("refused") == ""
    monkeypatch.setenv("RANK", "1")
    assert whose("refused") is None and whose("rng_1.pt: damaged") == "process 1"
    monkeypatch.setenv("MASTER_PORT", "1")  # no store to meet in: said, named
    assert whose("refused", wait_s=0.2) == "process 1"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert whose("refused") == ""
