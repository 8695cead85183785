"""What the stage 2 tests share: one tiny preprocessed corpus (8 utterances at 8 kHz: 7 train, 1 test), a config
per test over it, an in-process trainer, and readers of checkpoints and TensorBoard logs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from models.vocoders.diffusion.diffusion_vocoder_trainer import DiffusionVocoderTrainer
from processors.preprocess import preprocess
from tests.recipe_helpers import tiny_training_config
from utils.checkpoint import list_checkpoints
from utils.config import load_config
from utils.synthetic import write_corpus


def preprocessed_corpus(root: Path) -> Path:
    """A preprocessed corpus that a test module's runs share (features only; experiments go elsewhere)."""
    write_corpus(root / "corpus", 2, 4, sample_rate=8000)
    preprocess(load_config(tiny_training_config(root, "base.json")), num_workers=1)
    return root


def config(corpus: Path, tmp_path: Path, **train: object) -> Path:
    """A config file for this test: its own log_dir, the shared features, `train` overrides."""
    base = json.loads((corpus / "base.json").read_text())
    base["log_dir"] = str(tmp_path / "ckpts")
    base["train"].update(train)
    path = tmp_path / f"config_{len(list(tmp_path.glob('config_*')))}.json"
    path.write_text(json.dumps(base))
    return path


def trainer(path: Path, name: str, resume_type: str | None = None, checkpoint: str | None = None) -> DiffusionVocoderTrainer:
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh accelerate state per in-process run
    GradientState._reset_state()
    return DiffusionVocoderTrainer(load_config(path), name, resume_type, checkpoint)


def newest(exp: Path) -> Path:
    return list_checkpoints(exp / "checkpoint")[-1]


def weight_differences(a: Path, b: Path) -> torch.Tensor:
    """Every weight's absolute difference between two weight files of the same tensors, flattened into one."""
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    return torch.cat([(left[k] - right[k]).abs().flatten().float() for k in left])


def max_diff(a: Path, b: Path) -> float:
    return float(weight_differences(a, b).max())


def mean_diff(a: Path, b: Path) -> float:
    return float(weight_differences(a, b).mean())


def scalars(exp: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list] = {}
    for events in sorted(exp.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0, "audio": 0})
        acc.Reload()
        for kind, tags in acc.Tags().items():
            if kind in ("scalars", "images", "audio"):
                for tag in tags:
                    items = getattr(acc, {"scalars": "Scalars", "images": "Images", "audio": "Audio"}[kind])(tag)
                    found.setdefault(tag, []).extend(items)
    return found
