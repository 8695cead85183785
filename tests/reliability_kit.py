"""Shared pieces of the reliability tests: tiny configs, bad files, poisoned pickles, CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from models.vocoders.diffusion.train_state import TrainState
from utils.synthetic import synthetic_voice

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "egs/vocoder/diffusion/diffwave/demo/demo_config.json"
RUN_SH = REPO / "egs/vocoder/diffusion/diffwave/run.sh"
RATE, HOP, N_MEL, N_FFT = 8000, 64, 40, 256  # the demo config's settings
MIN_SAMPLES = max(HOP, (N_FFT - HOP) // 2 + 1)


class Payload:
    """Unpickling this creates `marker`: proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def write_config(folder: Path, corpus: Path | None = None, **sections: dict) -> Path:
    """A config over the demo recipe with every path in `folder` (absolute, as the tests run anywhere)."""
    cfg = {
        "base_config": str(DEMO_CONFIG),
        "dataset_path": {"demo": str(corpus or folder / "corpus")},
        "log_dir": str(folder / "ckpts"),
        "preprocess": {"processed_dir": str(folder / "data")},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    path = folder / "config.json"
    path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return path


def run_cmd(args: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run a bin or run.sh from the repo root the way run.sh does (PYTHONPATH = root)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def python_bin(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, str(REPO / "bins/vocoder" / name), *args], timeout=timeout)


def voice(seconds: float = 0.3, rate: int = RATE, seed: int = 0) -> np.ndarray:
    return synthetic_voice(seconds, rate, seed)


def write_audio_battery(folder: Path) -> dict[str, str]:
    """One file per bad-input case, plus the odd-but-valid ones; returns case -> file name."""
    folder.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}

    def wav(case: str, name: str, audio: np.ndarray, rate: int = RATE, subtype: str = "PCM_16") -> None:
        sf.write(folder / name, audio, rate, subtype=subtype)
        names[case] = name

    (folder / "empty.wav").write_bytes(b"")
    names["empty"] = "empty.wav"
    (folder / "text.wav").write_text("this is a text file, not audio\n", encoding="utf-8")
    names["text"] = "text.wav"
    wav("zero_length", "zero.wav", np.zeros(0, np.float32))
    wav("shorter_than_a_frame", "short.wav", voice()[: HOP // 2])
    bad = voice(seed=1).copy()
    bad[100] = np.nan
    wav("nan", "nan.wav", bad, subtype="FLOAT")
    bad = voice(seed=2).copy()
    bad[50] = np.inf
    wav("inf", "inf.wav", bad, subtype="FLOAT")
    wav("rate_1hz", "rate1.wav", voice(seed=12)[:2000], rate=1)  # a damaged header: resampled, 2000 s of audio
    wav("peak", "loud.wav", voice(seed=3) * 4.0, subtype="FLOAT")  # synthetic voices peak at 0.5: 2.0 here
    wav("pcm8", "pcm8.wav", voice(seed=4), subtype="PCM_U8")
    wav("pcm24", "pcm24.wav", voice(seed=5), subtype="PCM_24")
    wav("float32", "float32.wav", voice(seed=6), subtype="FLOAT")
    wav("stereo", "stereo.wav", np.stack([voice(seed=7), 0.5 * voice(seed=7)], axis=1))
    wav("rate8k", "rate8k.wav", voice(rate=8000, seed=8), rate=8000)
    wav("rate48k", "rate48k.wav", voice(rate=48000, seed=9), rate=48000)
    wav("space", "with space.wav", voice(seed=10))
    wav("non_ascii", "ünïcødé 声音.wav", voice(seed=11))
    return names


BAD_AUDIO = {  # case -> a word the one-line reason must contain
    "empty": "empty",
    "text": "decode",
    "zero_length": "zero-length",
    "shorter_than_a_frame": "too short",
    "nan": "NaN",
    "inf": "inf",
    "rate_1hz": "sample rate 1 Hz in its header",
}
GOOD_AUDIO = ("peak", "pcm8", "pcm24", "float32", "stereo", "rate8k", "rate48k", "space", "non_ascii")


def write_mel_battery(folder: Path, marker: Path) -> dict[str, str]:
    """One .npy per mel case; the object array carries a payload that must never run."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def mel(frames: int = 12) -> np.ndarray:
        return rng.uniform(-11, 0, (N_MEL, frames)).astype(np.float32)

    nan = mel()
    nan[3, 4] = np.nan
    arrays = {
        "good": ("good.npy", mel()),
        "transposed": ("transposed.npy", mel(14).T),
        "batch_of_one": ("batch1.npy", mel()[None]),
        "wrong_n_mel": ("n80.npy", rng.uniform(-11, 0, (80, 12)).astype(np.float32)),
        "one_d": ("flat.npy", mel().ravel()),
        "three_d": ("cube.npy", np.stack([mel(), mel()])),
        "nan": ("nan.npy", nan),
        "zero_frames": ("zero.npy", np.zeros((N_MEL, 0), np.float32)),
        "space": ("with space.npy", mel()),
        "non_ascii": ("ünïcødé 声音.npy", mel()),
    }
    names = {}
    for case, (name, array) in arrays.items():
        np.save(folder / name, array)
        names[case] = name
    np.save(folder / "object.npy", np.array([Payload(marker), 1], dtype=object), allow_pickle=True)
    names["object"] = "object.npy"
    (folder / "empty.npy").write_bytes(b"")
    names["empty"] = "empty.npy"
    return names


BAD_MELS = {
    "wrong_n_mel": "n_mel",
    "one_d": "2-D",
    "three_d": "2-D",
    "nan": "NaN",
    "zero_frames": "zero frames",
    "object": "numeric",
    "empty": "numeric",
}
GOOD_MELS = ("good", "transposed", "batch_of_one", "space", "non_ascii")


def make_experiment(folder: Path, config: Path, weights_file: str = "model.safetensors") -> Path:
    """An experiment folder as stage 2 leaves it (args.json + one checkpoint), with untrained tiny weights."""
    import torch

    from models.vocoders.diffusion.diffwave.diffwave import build_diffwave
    from utils.checkpoint import checkpoint_name, save_checkpoint
    from utils.config import load_config, save_config

    cfg = load_config(config)
    expt = folder / "expt"
    save_config(cfg, expt / "args.json")
    torch.manual_seed(0)
    model = build_diffwave(cfg)
    files = {weights_file: model.state_dict()}
    save_checkpoint(expt / "checkpoint" / checkpoint_name(0, 1, 0.5), files, {"epoch": 0, "step": 1})
    return expt


def tiny_train_state(step: int) -> TrainState:
    """A training state for CheckpointPolicy.save, with a 2x2 linear model."""
    import torch

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    return TrainState(model, optimizer, torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.99), step=step,
                      batch_in_epoch=step)
