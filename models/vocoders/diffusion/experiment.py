"""Which experiment and config stage 3 uses, whichever way the user names them.

Users of the original toolkit point `--infer_expt_dir` at an experiment, at its `checkpoint/`
folder or at one checkpoint folder, and pass the recipe's `--config` as its run.sh does.
The model must be rebuilt exactly as trained, so the experiment's `args.json` wins for every
setting that changes the result; `--config` contributes its `inference` section.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from utils.checkpoint import CHECKPOINT_PATTERN
from utils.config import load_config, merge, to_attrdict, to_plain

log = logging.getLogger(__name__)
# Settings that change the waveform a trained model produces: the mel it was trained on, and its shape.
RESULT_KEYS = (
    *(f"preprocess.{k}" for k in ("sample_rate", "hop_size", "n_fft", "win_size", "n_mel", "fmin", "fmax")),
    "model.generator", "model.diffwave.residual_channels", "model.diffwave.residual_layers",
    "model.diffwave.dilation_cycle_length", "model.diffwave.upsample_factors", "model.diffwave.noise_schedule_factors",
)


def locate_experiment(path: str | Path, checkpoint: str | None = None) -> tuple[Path, str | None]:
    """(experiment folder, checkpoint) from an experiment, its `checkpoint/` folder or one checkpoint folder."""
    path = Path(path)
    if (path / "args.json").is_file() or checkpoint:
        return path, checkpoint
    if path.name == "checkpoint" and (path.parent / "args.json").is_file():
        return path.parent, str(path)
    if CHECKPOINT_PATTERN.match(path.name) and (path.parent.parent / "args.json").is_file():
        return path.parent.parent, str(path)
    return path, checkpoint


def _value(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return to_plain(cfg)


def with_recipe_config(cfg: Any, config_path: str | Path | None) -> Any:
    """The experiment's config with `config_path`'s inference section; result-changing differences are warned about."""
    if not config_path:
        return cfg
    recipe = load_config(config_path)
    for key in RESULT_KEYS:
        ours, theirs = _value(cfg, key), _value(recipe, key)
        if theirs is not None and theirs != ours:
            log.warning("%s: %s is %s, but the experiment was trained with %s: using the experiment's value "
                        "(args.json); --config only sets the inference options", config_path, key, theirs, ours)
    cfg["inference"] = to_attrdict(merge(to_plain(cfg.get("inference", {}) or {}), to_plain(recipe.get("inference", {}) or {})))
    return cfg
