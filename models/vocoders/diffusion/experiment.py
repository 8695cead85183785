"""An experiment folder: its layout, its config, its model, its schedules and its mel contract.

Stage 2 writes the folder; stage 3, export and schedule search read it, all through `Experiment`,
so the file names below are spelled nowhere else.

Users of the original toolkit point `--infer_expt_dir` at an experiment, at its `checkpoint/`
folder or at one checkpoint folder, and pass the recipe's `--config` as its run.sh does.
The model must be rebuilt exactly as trained, so the experiment's `args.json` wins for every
setting that changes the result; `--config` contributes its `inference` section.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import suppress
from itertools import pairwise
from pathlib import Path
from typing import Any

from models.vocoders.diffusion.diffwave.diffwave import DiffWave, build_diffwave
from models.vocoders.diffusion.diffwave.geometry import upsample_factors
from models.vocoders.diffusion.train_state import weights_source
from processors.mel_conventions import mel_contract
from utils import file_lock
from utils.checkpoint import CHECKPOINT_CONFIG, CHECKPOINT_DIR, CHECKPOINT_PATTERN, load_into, load_weights, resolve_checkpoint
from utils.config import ConfigError, adopt_sources, load_config, merge, save_config, source_of, to_attrdict, to_plain
from utils.io import load_json, save_json

log = logging.getLogger(__name__)
ARGS_FILE = "args.json"
RECORDS_FILE = "ckpts.json"  # inside CHECKPOINT_DIR: which checkpoint each save kind keeps
SCHEDULE_FILE = "searched_schedule.json"
CONTRACT_FILE = "mel_contract.json"
LOCK_FILE = ".train.lock"
FINETUNE_FILE = "finetuned_from.json"  # the weights a finetune started from, until its first checkpoint stands
BETA_MIN, BETA_MAX = 1e-6, 0.9
# Settings that change the waveform a trained model produces: the mel it was trained on, and its shape.
RESULT_KEYS = (
    *(f"preprocess.{k}" for k in ("sample_rate", "hop_size", "n_fft", "win_size", "n_mel", "fmin", "fmax")),
    "model.generator", "model.diffwave.residual_channels", "model.diffwave.residual_layers",
    "model.diffwave.dilation_cycle_length", "model.diffwave.upsample_factors", "model.diffwave.noise_schedule_factors",
)


def is_valid(betas: Sequence[float]) -> bool:
    """Strictly increasing and within (BETA_MIN, BETA_MAX): what the fast sampler can walk back."""
    return all(BETA_MIN <= b <= BETA_MAX for b in betas) and all(a < b for a, b in pairwise(betas))


class Experiment:
    """The folder stage 2 writes under `<log_dir>/<name>`, and everything read back from it."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.args = self.root / ARGS_FILE
        self.checkpoints = self.root / CHECKPOINT_DIR
        self.records = self.checkpoints / RECORDS_FILE
        self.schedules = self.root / SCHEDULE_FILE
        self.contract = self.root / CONTRACT_FILE
        self.finetune = self.root / FINETUNE_FILE
        self.created = False  # by this object's lock(): a refused setup may remove it again
        self.lock_found = (self.root / LOCK_FILE).is_file()  # left by an earlier training (seen before this one locks)

    def lock(self) -> None:
        """Hold `.train.lock` until `unlock` or exit: two trainers here would overwrite each other's checkpoints."""
        self.created = not self.root.exists() and not self.root.is_symlink()
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            file_lock.take(self.root / LOCK_FILE, exclusive=True)
        except file_lock.LockBusy as busy:
            raise ConfigError(f"{self.root}: another training (pid {busy.holder}) is using this experiment") from None

    def unlock(self, remove_if_created: bool = False) -> None:
        """Release the lock; with `remove_if_created`, a folder that lock() created and that holds nothing but the
        lock and an empty checkpoint folder goes too (a refused setup leaves nothing behind)."""
        if not file_lock.release(self.root / LOCK_FILE):
            return
        if remove_if_created and self.created:
            with suppress(OSError):  # anything else in it (written meanwhile): the folder stays
                (self.root / LOCK_FILE).unlink()
                if self.checkpoints.is_dir() and not self.checkpoints.is_symlink():
                    self.checkpoints.rmdir()
                self.root.rmdir()

    def stopped_in_setup(self) -> bool:
        """A training was started here and stopped during its setup, before it wrote args.json: its lock file is all
        it left."""
        return self.lock_found and not self.args.is_file()

    def finetuned_from(self) -> str | None:
        """The checkpoint this experiment was finetuned from, where it was a finetune."""
        try:
            source = load_json(self.finetune).get("checkpoint") if self.finetune.is_file() else None
        except (OSError, ValueError, AttributeError):
            source = "(unreadable record)"
        return str(source) if source is not None else None

    def config(self) -> Any:
        if not self.args.is_file():
            raise ConfigError(f"{self.args}: missing; is '{self.root}' an experiment folder written by stage 2?")
        return load_config(self.args)

    def trained_under(self, folder: Path) -> Any | None:
        """The config that trained checkpoint `folder` (see trained_config); this experiment's args.json where its
        copy is unreadable (a resume under --config must not fail on it), None where neither exists."""
        try:
            return trained_config(folder)
        except ConfigError as err:
            log.warning("%s; compared with %s instead", err, self.args)
            return load_config(self.args) if self.args.is_file() else None

    def write_setup(self, cfg: Any, resumed_from: Path | None = None, resumed_step: int = 0,
                    finetuned_from: Path | None = None) -> None:
        """The run's config and the mel contract it trains on, beside its checkpoints; a finetune's source first (a
        finetune stopped before its first checkpoint is started again from it, never resumed from untrained weights).

        A resume under another config than its checkpoint's keeps that one as `args.<step>.json`: what trained the
        weights up to there. One kept already stays (a later resume from that step replaces a config that trained
        nothing kept).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        if finetuned_from is not None:
            save_json(self.finetune, {"checkpoint": str(finetuned_from)})
        kept = self.root / f"args.{resumed_step}.json"
        trained = self.trained_under(resumed_from) if resumed_from is not None and not kept.exists() else None
        if trained is not None and _settings(trained) != _settings(cfg):
            save_config(trained, kept)
        save_config(cfg, self.args)
        save_json(self.contract, mel_contract(cfg.preprocess))

    def refuse_changed_results(self, cfg: Any, folder: Path) -> None:
        """A resume from checkpoint `folder` trains on under the settings its weights learnt (RESULT_KEYS): another
        mel or noise schedule would silently train a different model on top of them."""
        trained = self.trained_under(folder)
        for key, ours, theirs in differing_results(cfg, trained) if trained is not None else []:
            raise ConfigError(f"{source_of(cfg, key)}: {key} is {ours}, but {folder} was trained with {theirs}; resume "
                              "with that config (or with --checkpoint and no --config, which reads the config it was "
                              "trained under), or finetune into another --name to change it")

    def read_contract(self) -> dict:
        """The experiment's mel contract; experiments older than the file get it derived from args.json."""
        if self.contract.is_file():
            contract = load_json(self.contract)
            if not isinstance(contract, dict) or "n_mel" not in contract:
                raise ConfigError(f"{self.contract}: not a mel contract (no 'n_mel')")
            return contract
        if self.args.is_file():
            return mel_contract(load_config(self.args).preprocess)
        raise ConfigError(f"{self.root}: neither {CONTRACT_FILE} nor {ARGS_FILE}; "
                          "is it an experiment folder written by stage 2?")

    def load_model(self, cfg: Any, checkpoint: str | None = None, use_ema: bool = True) -> DiffWave:
        """The newest complete checkpoint (or `checkpoint`), EMA weights when present, in eval mode."""
        source = weights_source(resolve_checkpoint(checkpoint or self.checkpoints), use_ema)
        model = build_diffwave(cfg)
        load_into(model, load_weights(source), source)
        log.info("loaded %s", source)
        return model.eval()

    def save_schedule(self, result: dict) -> Path:
        """Add (or replace) this step count's searched schedule; it becomes the default."""
        data = load_json(self.schedules) if self.schedules.is_file() else {"schedules": {}}
        data["schedules"][str(result["steps"])] = result
        data["default"] = str(result["steps"])
        save_json(self.schedules, data)
        return self.schedules

    def searched_betas(self, steps: int | None = None) -> list[float]:
        """The searched schedule with `steps` betas (default: the one searched last)."""
        path = self.schedules
        if not path.is_file():
            raise ConfigError(f"{path}: missing; run bins/vocoder/search_schedule.py --expt_dir {self.root} --steps N first")
        data = load_json(path)
        schedules = data.get("schedules", {})
        key = str(steps) if steps else str(data.get("default"))
        if key not in schedules:
            raise ConfigError(f"{path}: no {key}-step schedule; searched: {', '.join(sorted(schedules, key=int)) or 'none'}")
        betas = [float(b) for b in schedules[key]["betas"]]
        if not is_valid(betas):
            raise ConfigError(f"{path}: the {key}-step schedule is not a strictly increasing sequence in "
                              f"[{BETA_MIN}, {BETA_MAX}]")
        log.info("searched %s-step schedule from %s: %s", key, path, ", ".join(f"{b:.3g}" for b in betas))
        return betas


def locate_experiment(path: str | Path, checkpoint: str | None = None) -> tuple[Path, str | None]:
    """(experiment folder, checkpoint) from an experiment, its `checkpoint/` folder or one checkpoint folder."""
    path = Path(path)
    if Experiment(path).args.is_file() or checkpoint:
        return path, checkpoint
    if path.name == CHECKPOINT_DIR and Experiment(path.parent).args.is_file():
        return path.parent, str(path)
    if CHECKPOINT_PATTERN.match(path.name) and Experiment(path.parent.parent).args.is_file():
        return path.parent.parent, str(path)
    return path, checkpoint


def differing_results(cfg: Any, trained: Any) -> list[tuple[str, Any, Any]]:
    """(key, ours, theirs) for each RESULT_KEYS setting `trained` has and `cfg` sets otherwise."""
    pairs = ((key, _value(cfg, key), _value(trained, key)) for key in RESULT_KEYS)
    return [(key, ours, theirs) for key, ours, theirs in pairs if theirs is not None and ours != theirs]


def trained_config(weights: Path) -> Any | None:
    """The config that trained a checkpoint folder's (or weights file's) weights, where it can be found."""
    folder = weights if weights.is_dir() else weights.parent
    in_experiment = folder.parent.name == CHECKPOINT_DIR  # a loose file's grandparent is no experiment of its
    for path in (folder / CHECKPOINT_CONFIG, *([folder.parent.parent / ARGS_FILE] if in_experiment else [])):
        if path.is_file():
            return load_config(path)
    return None


def _value(cfg: Any, dotted: str) -> Any:
    """A setting as it acts: fmax null is the Nyquist frequency, so the two never count as different models."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if dotted == "preprocess.fmax" and node is None:
        rate = _value(cfg, "preprocess.sample_rate")
        return None if rate is None else float(rate) / 2
    return float(node) if dotted == "preprocess.fmax" and isinstance(node, int | float) else to_plain(node)


def _settings(cfg: Any) -> dict:
    """A config without what segments of one run change (the bounds, where it was read from and lies)."""
    plain = to_plain(cfg)
    plain.pop("config_path", None)
    plain.pop("log_dir", None)
    for key in ("max_steps", "max_epoch", "max_minutes"):
        plain.get("train", {}).pop(key, None)
    return plain


def with_recipe_config(cfg: Any, config_path: str | Path | None) -> Any:
    """The experiment's config with `config_path`'s inference section; result-changing differences are warned about."""
    if not config_path:
        return cfg
    recipe = load_config(config_path)
    for key in RESULT_KEYS:
        ours, theirs = _value(cfg, key), _value(recipe, key)
        derived = ours is None and key == "model.diffwave.upsample_factors"
        ours = upsample_factors(cfg) if derived else ours
        if theirs is not None and theirs != ours:
            log.warning("%s: %s is %s, but the experiment was trained with %s%s: using the experiment's value (%s); "
                        "--config only sets the inference options", source_of(recipe, key), key, theirs, ours,
                        " (derived from the hop size)" if derived else "", ARGS_FILE)
    cfg["inference"] = to_attrdict(merge(to_plain(cfg.get("inference", {}) or {}), to_plain(recipe.get("inference", {}) or {})))
    adopt_sources(cfg, recipe, "inference")
    return cfg
