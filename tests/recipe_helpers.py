"""Shared pieces for tests that drive the recipe through run.sh."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "egs/vocoder/diffusion/diffwave/run.sh"
# The smallest trainer config the in-process training tests share: an 8-channel, 4-layer DiffWave at 8 kHz.
TINY_TRAINING = {
    "base_config": str(REPO / "egs/vocoder/diffusion/diffwave/exp_config.json"),
    "dataset": ["demo"], "use_custom_dataset": ["demo"],
    "preprocess": {"n_mel": 20, "sample_rate": 8000, "hop_size": 64, "win_size": 256, "n_fft": 256, "fmax": 4000,
                   "cut_mel_frame": 8},
    "model": {"diffwave": {"residual_channels": 8, "residual_layers": 4, "dilation_cycle_length": 2,
                           "upsample_factors": [8, 8]}},
    "train": {"batch_size": 4, "max_epoch": -1, "save_checkpoint_stride": [1], "keep_last": [-1], "run_eval": [False],
              "ema_decay": 0.99, "adamw": {"lr": 1e-3}, "dataloader": {"num_worker": 0}, "eval_utterances": 1,
              "compile": False},
}


def tiny_training_config(root: Path, name: str, **train: object) -> Path:
    """TINY_TRAINING on `<root>/corpus`, features in `<root>/data`, experiments in `<root>/ckpts`; `train` overrides."""
    config = dict(TINY_TRAINING, dataset_path={"demo": str(root / "corpus")}, log_dir=str(root / "ckpts"),
                  preprocess=dict(TINY_TRAINING["preprocess"], processed_dir=str(root / "data")),
                  train=dict(TINY_TRAINING["train"], **train))
    path = root / name
    path.write_text(json.dumps(config))
    return path


def tiny_config(root: Path, dataset: str = "toy", **train) -> Path:
    """A small but real recipe config: 8 kHz, hop 64, 40 mels, a 6-layer 16-channel DiffWave."""
    cfg = {
        "base_config": "egs/vocoder/diffusion/diffwave/exp_config.json",
        "dataset": [dataset], "use_custom_dataset": [dataset], "dataset_path": {dataset: str(root / "corpus")},
        "log_dir": str(root / "ckpts"),
        "preprocess": {"processed_dir": str(root / "data"), "sample_rate": 8000, "hop_size": 64, "n_fft": 256,
                       "win_size": 256, "n_mel": 40, "fmax": 4000, "cut_mel_frame": 16},
        "model": {"diffwave": {"residual_channels": 16, "residual_layers": 6, "dilation_cycle_length": 3,
                               "upsample_factors": [8, 8]}},
        "train": {"batch_size": 8, "max_steps": 200, "save_checkpoint_stride": [1000], "ema_decay": 0.999,
                  "adamw": {"lr": 2e-3}, "dataloader": {"num_worker": 0}, "compile": False, **train},
        "inference": {"batch_size": 4},
    }
    path = root / f"config_{len(list(root.glob('config_*.json')))}.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def run_recipe(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    result = subprocess.run(["sh", str(RUN_SH), *args], cwd=cwd or REPO, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"run.sh {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result
