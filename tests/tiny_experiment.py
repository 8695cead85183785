"""Tiny configs: `model_cfg`, all a DiffWave and its samplers need; `tiny_cfg`, a whole recipe config;
and a stage-2 experiment folder without training (a tiny random DiffWave, args.json, one checkpoint).

The output projection (zero at initialisation) gets random weights so the waveform depends on
the mel, which is what conversion and export tests must see.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.vocoders.diffusion.diffwave.diffwave import build_diffwave
from models.vocoders.diffusion.experiment import Experiment
from utils.checkpoint import save_checkpoint
from utils.config import load_config, merge, to_attrdict, to_plain

REPO = Path(__file__).resolve().parents[1]
TINY_PRE = {"sample_rate": 8000, "hop_size": 64, "n_fft": 256, "win_size": 256, "n_mel": 20, "fmin": 0, "fmax": 4000}


def model_cfg(n_mel: int = 10, hop: int = 16, **diffwave: Any) -> Any:
    """The least config a DiffWave and its samplers need (no corpus, no paths): 8 channels, 4 layers unless told."""
    params = {"residual_channels": 8, "residual_layers": 4, "dilation_cycle_length": 2,
              "noise_schedule_factors": [1e-4, 0.05, 50], "inference_noise_schedule": [0.0001, 0.001, 0.01, 0.05, 0.2, 0.5],
              "upsample_factors": [4, 4], **diffwave}
    return to_attrdict({"preprocess": {"n_mel": n_mel, "hop_size": hop}, "model": {"diffwave": params}})


def tiny_cfg(root: Path, **preprocess: Any) -> Any:
    base = to_plain(load_config(REPO / "egs/vocoder/diffusion/diffwave/exp_config.json"))
    override = {
        "dataset": ["toy"], "use_custom_dataset": ["toy"], "dataset_path": {"toy": str(root / "corpus")},
        "log_dir": str(root / "ckpts"),
        "preprocess": {**TINY_PRE, "processed_dir": str(root / "data"), **preprocess},
        "model": {"diffwave": {"residual_channels": 8, "residual_layers": 4, "dilation_cycle_length": 2,
                               "upsample_factors": None}},
    }
    return to_attrdict(merge(base, override))


def make_experiment(root: Path, seed: int = 0, **preprocess: Any) -> tuple[Path, Any]:
    """`<root>/ckpts/toy` holding args.json, mel_contract.json and a complete checkpoint."""
    cfg = tiny_cfg(root, **preprocess)
    torch.manual_seed(seed)
    model = build_diffwave(cfg)
    torch.nn.init.normal_(model.output_projection.weight, std=0.3)
    expt = root / "ckpts" / "toy"
    Experiment(expt).write_setup(cfg)
    save_checkpoint(expt / "checkpoint" / "epoch-0001_step-0000001_loss-0.500000",
                    {"model.safetensors": model.state_dict()}, {"step": 1, "epoch": 1})
    return expt, cfg
