"""Issue 8: loaders never run code from a file, interrupted work never corrupts, a full disk is reported.

The SIGKILL tests start the real bins (python bins/vocoder/{preprocess,train}.py) and kill them at seeded
random moments. About 70 s on two busy cores, most of it process start-up (torch imports).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from processors.preprocess import feature_bytes, preprocess
from tests.reliability_kit import REPO, Payload, make_experiment, python_bin, tiny_train_state, write_config
from utils.checkpoint import (
    CHECKPOINT_PATTERN,
    CheckpointError,
    checkpoint_name,
    list_checkpoints,
    load_weights,
    read_state,
    resolve_checkpoint,
    safe_torch_load,
    save_checkpoint,
)
from utils.config import load_config, to_attrdict
from utils.io import atomic_write_text, load_npy, remove_stale_temps
from utils.synthetic import write_corpus

# ----- 1. safe loading -------------------------------------------------------------------------------------


def calls(text: str, name: str) -> list[str]:
    """The full text of every `name(...)` call in `text` (balanced parentheses)."""
    found = []
    for match in re.finditer(re.escape(name) + r"\(", text):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        found.append(text[match.start() : end + 1])
    return found


def test_every_torch_load_is_weights_only_and_np_load_is_in_one_place():
    sources = [p for p in REPO.rglob("*.py") if not ({"tests", ".git", ".venv"} & set(p.relative_to(REPO).parts))]
    torch_loads, np_loads = [], []
    for path in sources:
        text = path.read_text(encoding="utf-8")
        torch_loads += [(path, c) for c in calls(text, "torch.load")]
        np_loads += [(path, c) for c in calls(text, "np.load") + calls(text, "numpy.load")]
        assert "allow_pickle=True" not in text, path
    assert torch_loads and all("weights_only=True" in c for _p, c in torch_loads), torch_loads
    assert {p.relative_to(REPO).as_posix() for p, _c in np_loads} == {"utils/io.py"}
    assert all("allow_pickle=False" in c for _p, c in np_loads)


def poison(path: Path, marker: Path, style: str = "torch") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if style == "torch":
        torch.save({"weights": torch.zeros(2), "evil": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"evil": Payload(marker)}, protocol=2))  # legacy format: no zip container
    return path


@pytest.mark.parametrize("style", ["torch", "raw_pickle"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, style):
    marker = tmp_path / "ran"
    path = poison(tmp_path / "optimizer.pt", marker, style)
    with pytest.raises(CheckpointError) as err:
        safe_torch_load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: refused") and "posix.system" in message and "\n" not in message
    assert "weights_only` set to `False`" not in message  # torch's advice to turn the protection off is dropped
    assert not marker.exists()


def test_object_npy_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "ran"
    np.save(tmp_path / "mel.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"not a plain numeric \.npy array"):
        load_npy(tmp_path / "mel.npy")
    assert not marker.exists()


def test_stage3_refuses_a_poisoned_pytorch_model_bin(tmp_path):
    """A downloaded experiment whose checkpoint holds only a pytorch_model.bin carrying a payload."""
    marker = tmp_path / "ran"
    expt = make_experiment(tmp_path, write_config(tmp_path), weights_file="pytorch_model.bin")
    folder = resolve_checkpoint(expt / "checkpoint")
    poison(folder / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError, match="refused"):
        load_weights(folder)
    (tmp_path / "audio").mkdir()
    result = python_bin("inference.py", "--infer_mode", "infer_from_audio", "--infer_expt_dir", str(expt),
                        "--audio_folder", str(tmp_path / "audio"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"error: {folder / 'pytorch_model.bin'}: refused"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not marker.exists()


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """A tiny processed corpus and a config that trains a tiny model for a few steps, saving every step."""
    root = tmp_path_factory.mktemp("train")
    write_corpus(root / "corpus", 2, 5, seconds=(0.5, 0.8))
    config = write_config(root, train={
        "batch_size": 4, "max_steps": 24, "save_checkpoints_steps": 1, "keep_last": [2], "run_eval": [False],
        "save_checkpoint_stride": [1000], "eval_utterances": 0, "dataloader": {"num_worker": 0},
    })
    preprocess(load_config(config), num_workers=1)
    return root, config


def start_training(config: Path, name: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    args = [sys.executable, "bins/vocoder/train.py", "--config", str(config), "--exp_name", name, *extra]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_resume_and_finetune_refuse_poisoned_checkpoints(processed, tmp_path):
    _root, config = processed
    marker = tmp_path / "ran"
    expt = make_experiment(tmp_path, config)
    good = resolve_checkpoint(expt / "checkpoint")
    optimizer = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())
    torch.save(torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9).state_dict(), good / "scheduler.pt")
    poison(good / "optimizer.pt", marker)
    weights = poison(tmp_path / "downloaded" / "pytorch_model.bin", marker, "raw_pickle")
    runs = {
        "resume": (start_training(config, "r", "--resume_type", "resume", "--checkpoint", str(good)), good / "optimizer.pt"),
        "finetune": (start_training(config, "f", "--resume_type", "finetune", "--checkpoint", str(weights)), weights),
    }
    for kind, (proc, culprit) in runs.items():
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, (kind, err)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert lines == [line for line in lines if line.startswith(f"error: {culprit}: refused")] and lines, (kind, err)
        assert "Traceback" not in err
    assert not marker.exists()


# ----- 2. atomic writes and SIGKILL ------------------------------------------------------------------------


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "meta.json"
    atomic_write_text(target, "old")

    def broken(handle):
        handle.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    from utils.io import atomic_write

    with pytest.raises(OSError):
        atomic_write(target, broken)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".x.npy.{int(dead.stdout)}.abcd1234.tmp"
    live = tmp_path / f".y.npy.{os.getpid()}.efgh5678.tmp"
    for path in (stale, live, tmp_path / "z.npy"):
        path.write_bytes(b"partial")
    assert remove_stale_temps(tmp_path) == 1
    assert not stale.exists() and live.exists() and (tmp_path / "z.npy").exists()


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*.npy")}


def complete_pairs(data: Path) -> dict[str, int]:
    """mtimes of the features whose mel and audio both exist (audio is written first, so these are finished)."""
    done = snapshot(data)
    stems = [k[len("mels/"):] for k in done if k.startswith("mels/") and f"audios/{k[len('mels/'):]}" in done]
    return {f"{kind}/{stem}": done[f"{kind}/{stem}"] for stem in stems for kind in ("mels", "audios")}


def test_sigkilled_preprocessing_resumes_without_redoing_or_leaving_partials(tmp_path):
    write_corpus(tmp_path / "corpus", 2, 20, seconds=(0.25, 0.5))
    config = write_config(tmp_path)
    data = tmp_path / "data" / "demo"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    args = [sys.executable, "bins/vocoder/preprocess.py", "--config", str(config), "--num_workers", "1"]
    targets = sorted(random.Random(8).sample(range(1, 39), 3))
    for seed, target in enumerate(targets):
        rng = random.Random(seed)
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and len(list((data / "mels").glob("*.npy"))) < target:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.03))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for path in data.rglob("*.npy"):
            load_npy(path)  # every file under its final name is complete
    before = complete_pairs(data)
    assert 0 < len(before) // 2 < 40
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    after = snapshot(data)
    assert len(after) == 80 and all(after[k] == v for k, v in before.items())  # finished files untouched
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert f"features: {40 - len(before) // 2} done" in result.stderr


def check_checkpoints(ckpt_dir: Path) -> int:
    """Every folder under a checkpoint name is complete and loads safely; returns the newest step."""
    named = [p for p in ckpt_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name)]
    assert named and set(named) == set(list_checkpoints(ckpt_dir))
    for folder in named:
        load_weights(folder)
        for path in folder.glob("*.pt"):
            safe_torch_load(path)
        assert read_state(folder)["step"] == int(CHECKPOINT_PATTERN.match(folder.name).group(2))
    return read_state(resolve_checkpoint(ckpt_dir.parent))["step"]


def test_sigkilled_training_resumes_from_a_complete_checkpoint(processed):
    root, config = processed
    ckpt_dir = root / "ckpts" / "killed" / "checkpoint"
    newest = 0
    for seed in range(2):
        rng = random.Random(seed)
        proc = start_training(config, "killed", *(["--resume_type", "resume"] if seed else []))
        while proc.poll() is None and not any(
            CHECKPOINT_PATTERN.match(p.name) and int(CHECKPOINT_PATTERN.match(p.name).group(2)) > newest
            for p in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else ())
        ):
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.4))
        proc.send_signal(signal.SIGKILL)
        _out, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), err
        step = check_checkpoints(ckpt_dir)
        assert step > newest
        newest = step
        if proc.returncode == 0:  # finished before the kill landed
            break
    proc = start_training(config, "killed", "--resume_type", "resume")
    _out, err = proc.communicate(timeout=180)
    # A run that finished before its kill landed leaves nothing to do: the resume says so and fails.
    already_done = "already at step 24 of max_steps 24; raise --max_steps to continue" in err
    assert proc.returncode == (1 if already_done else 0), err
    assert "resumed from" in err and check_checkpoints(ckpt_dir) == 24
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".")]  # leftover temp folders were cleaned


def test_half_written_checkpoint_folder_is_never_resolved(tmp_path):
    root = tmp_path / "checkpoint"
    save_checkpoint(root / checkpoint_name(0, 5, 0.1), {"model.safetensors": {"w": torch.ones(2)}}, {"step": 5})
    (root / f".tmp-{checkpoint_name(0, 9, 0.1)}").mkdir()  # a save killed midway
    (root / f".tmp-{checkpoint_name(0, 9, 0.1)}" / "model.safetensors").write_bytes(b"partial")
    (root / checkpoint_name(0, 7, 0.1)).mkdir()  # a final name without state.json (written by hand?)
    assert resolve_checkpoint(tmp_path).name == checkpoint_name(0, 5, 0.1)
    save_checkpoint(root / checkpoint_name(0, 6, 0.1), {"model.safetensors": {"w": torch.ones(2)}}, {"step": 6})
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert resolve_checkpoint(tmp_path).name == checkpoint_name(0, 6, 0.1)


# ----- 6. disk and resources -------------------------------------------------------------------------------


def test_preprocessing_refuses_to_start_without_disk_space(tmp_path, monkeypatch, caplog):
    write_corpus(tmp_path / "corpus", 1, 4, seconds=(0.5, 0.5))
    cfg = load_config(write_config(tmp_path))
    monkeypatch.setattr("processors.preprocess.shutil.disk_usage", lambda _p: SimpleNamespace(free=10_000))
    with pytest.raises(OSError) as err:
        preprocess(cfg, num_workers=1)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'data'}: not enough free disk space") and "need about" in message
    assert not list((tmp_path / "data").rglob("*.npy"))
    monkeypatch.undo()
    preprocess(cfg, num_workers=1)
    written = sum(p.stat().st_size for p in (tmp_path / "data").rglob("*.npy"))
    entries = json.loads((tmp_path / "data/demo/train.json").read_text()) + json.loads(
        (tmp_path / "data/demo/test.json").read_text())
    assert 0.95 < feature_bytes(cfg.preprocess, entries) / written < 1.1  # the estimate matches what is written


def test_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from models.vocoders.diffusion.checkpointing import CheckpointPolicy

    root = tmp_path / "checkpoint"
    policy = CheckpointPolicy(to_attrdict({"train": {"save_checkpoints_steps": 1, "keep_last": [1]}}), root)
    first = tiny_train_state(1)
    kept = policy.save(first, 0.5, [{"torch": torch.get_rng_state()}], ["steps"])

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("utils.checkpoint.save_file", full)
    second = tiny_train_state(2)
    with pytest.raises(OSError) as err:
        policy.save(second, 0.4, [{"torch": torch.get_rng_state()}], ["steps"])
    message = str(err.value)
    assert "No space left on device" in message and "earlier checkpoints are kept" in message and "\n" not in message
    assert [p.name for p in root.iterdir() if p.is_dir()] == [kept.name]
    assert resolve_checkpoint(root) == kept and load_weights(kept)["weight"].shape == (2, 2)
    assert json.loads((root / "ckpts.json").read_text())["latest"] == kept.name
