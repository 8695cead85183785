"""What each stage needs of a config: the schema of the keys the recipe reads, checked before any work starts,
and the unknown keys (usually typos) warned about with the closest known one."""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import json5

from utils.config import (
    BOOL_OR_AUTO,
    INT,
    LIST,
    NONE,
    NUMBER,
    PLACEHOLDER,
    REPO_ROOT,
    STR,
    ConfigError,
    dotted_keys,
    is_kind,
    lookup,
    require,
    source_of,
)
from utils.io import MAX_NAME_BYTES, safe_name

log = logging.getLogger(__name__)

GENERATORS = ("diffwave",)
SAMPLER_NAMES = ("fast", "full", "ddim", "searched")


@dataclass(frozen=True)
class Rule:
    """What one key must hold, and for which stages (p: preprocess, t: train, i: inference, e: evaluation).

    `low`/`high` bound a number (or each item of a list), inclusive unless `open_low`/`open_high`.
    """

    kind: tuple[type, ...]
    stages: str
    required: bool = True
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] = ()
    items: tuple[type, ...] = ()
    length: int | None = None
    nonempty: bool = False
    distinct: bool = False  # a list naming an item twice (a dataset: its utterances would count twice)


def positive(kind: tuple[type, ...], stages: str, required: bool = True, items: tuple[type, ...] = ()) -> Rule:
    return Rule(kind, stages, required, low=0, open_low=True, items=items)


def below_one(stages: str, required: bool = True) -> Rule:
    """A decay or momentum: 0 <= value < 1."""
    return Rule(NUMBER, stages, required, low=0, high=1, open_high=True)


def switch(stages: str) -> Rule:
    """An optional true / false / "auto" setting."""
    return Rule(BOOL_OR_AUTO, stages, required=False, choices=(True, False, "auto"))


# torch.compile's modes; "reduce-overhead" replays CUDA graphs, "max-autotune" also tunes its matmuls; "auto" is the
# trainer's choice by device (device_policy.compile_mode).
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# The keys the recipe reads, with the ranges the DSP and DDPM maths need; other keys are reported by
# unknown_keys (original configs carry many more, which still load).
SCHEMA: dict[str, Rule] = {
    # keys of the original's configs that select what we always do: checked, so a different choice is no silent no-op
    "model_type": Rule(STR, "pti", required=False, choices=("DiffusionVocoder",)),
    "task_type": Rule(STR, "pti", required=False, choices=("", "vocoder")),
    **{f"preprocess.{k}": Rule((bool,), "pt", required=False, choices=(True,))
       for k in ("extract_mel", "extract_audio", "use_mel", "use_audio")},
    "train.tracker": Rule(LIST, "t", required=False, items=STR, choices=("tensorboard",)),
    "train.dataloader.pin_memory": Rule((bool,), "t", required=False),
    "dataset": Rule(LIST, "pt", items=STR, nonempty=True, distinct=True),  # []: stage 1 did nothing and exited 0
    "dataset_path": Rule((dict,), "p"),
    "use_custom_dataset": Rule(LIST, "p", required=False, items=STR),
    "log_dir": Rule(STR, "t"),
    "preprocess.processed_dir": Rule(STR, "pti"),
    "preprocess.train_file": Rule(STR, "pt"),
    "preprocess.valid_file": Rule(STR, "pti"),
    "preprocess.spk2id": Rule(STR, "pt", required=False),
    "preprocess.utt2spk": Rule(STR, "pt", required=False),
    **{f"preprocess.{k}": positive(INT, "ptie") for k in ("sample_rate", "n_fft", "win_size", "hop_size", "n_mel")},
    "preprocess.fmin": Rule(NUMBER, "ptie", required=False, low=0),
    "preprocess.fmax": Rule(NUMBER + NONE, "ptie", required=False, low=0, open_low=True),
    "preprocess.cut_mel_frame": positive(INT, "t"),
    "model.generator": Rule(STR, "ti", choices=GENERATORS),
    **{f"model.diffwave.{k}": positive(INT, "ti") for k in ("residual_channels", "residual_layers", "dilation_cycle_length")},
    "model.diffwave.noise_schedule_factors": Rule(LIST, "ti", items=NUMBER, length=3),  # ranges: _cross_checks
    "model.diffwave.inference_noise_schedule": Rule(LIST, "ti", items=NUMBER, low=0, high=1, open_low=True,
                                                    open_high=True, nonempty=True),
    "model.diffwave.upsample_factors": positive(LIST + NONE, "ti", required=False, items=INT),
    "train.batch_size": positive(INT, "t"),
    "train.max_epoch": Rule(INT, "t", required=False, low=-1),
    "train.max_steps": Rule(INT, "t", required=False, low=0),
    "train.max_minutes": Rule(NUMBER, "t", required=False, low=0),
    "train.random_seed": Rule(INT, "t", required=False, low=0),
    "train.gradient_accumulation_step": positive(INT, "t", required=False),
    "train.save_checkpoint_stride": Rule(LIST, "t", required=False, items=INT, low=0),
    "train.keep_last": Rule(LIST, "t", required=False, items=INT, low=-1),
    "train.run_eval": Rule(LIST, "t", required=False, items=(bool,)),  # per stride, as keep_last
    "train.save_checkpoints_steps": Rule(INT, "t", required=False, low=0),
    "train.adamw.lr": Rule(NUMBER, "t", low=0, high=1, open_low=True),  # above 1, AdamW overflows at once
    "train.eval_utterances": Rule(INT, "t", required=False, low=0),
    "train.eval_seconds": positive(NUMBER, "t", required=False),
    "train.adamw.adam_b1": below_one("t"),
    "train.adamw.adam_b2": below_one("t"),
    "train.exponential_lr.lr_decay": Rule(NUMBER, "t", low=0, high=1, open_low=True),
    "train.ema_decay": below_one("t", required=False),
    "train.max_grad_norm": Rule(NUMBER, "t", required=False, low=0),
    "train.mixed_precision": Rule(STR, "t", required=False, choices=("auto", "no", "fp16", "bf16")),
    "train.dataloader.num_worker": Rule(INT, "t", required=False, low=-1),
    "train.num_threads": Rule(INT, "t", required=False, low=0),
    "train.max_nonfinite_steps": positive(INT, "t", required=False),
    "train.compile": switch("t"),
    "train.compile_mode": Rule(STR, "t", required=False, choices=COMPILE_MODES),
    "train.cudnn_benchmark": Rule((bool,), "t", required=False),
    "train.tf32": Rule((bool,), "t", required=False),
    "train.channels_last": switch("t"),
    "train.adamw.fused": switch("t"),
    "inference.batch_size": positive(INT, "i", required=False),
    "inference.engine": Rule(STR, "i", required=False, choices=("auto", "fused", "tiled", "plain")),
    # stage 2's evaluation vocodes in this precision: a bad one stopped the run at its first eval, after hours of training
    "inference.precision": Rule(STR, "ti", required=False, choices=("auto", "fp32", "fp16", "bf16")),
    "inference.compile": switch("i"),
    "inference.cuda_graph": switch("i"),
    "inference.gpu_memory_gib": Rule(NUMBER + NONE, "i", required=False, low=0, open_low=True),
    "inference.sampler": Rule(STR, "i", required=False, choices=SAMPLER_NAMES),
    "inference.steps": positive(INT, "i", required=False),  # ddim's bound (the training steps): vocoder_from_experiment
    "inference.chunk_size": positive(INT, "i", required=False),
    "inference.tile": positive(INT + NONE, "i", required=False),
    "inference.cache_gib": Rule(NUMBER, "i", required=False, low=0),
    "inference.mel_convention": Rule(STR, "i", required=False),  # its names: processors.mel_conventions
    "inference.mel_stats": Rule(STR + NONE, "i", required=False),
}
STAGES = {"preprocess": "p", "train": "t", "inference": "i", "evaluation": "e"}  # evaluation: the mel it scores with


def _check_range(where: str, value: Any, rule: Rule) -> None:
    values = value if isinstance(value, list) else [value]
    for item in values:
        if not is_kind(item, NUMBER):
            continue
        if not math.isfinite(item):
            raise ConfigError(f"{where} must be a finite number, got {item!r}")
        low_bad = rule.low is not None and (item <= rule.low if rule.open_low else item < rule.low)
        high_bad = rule.high is not None and (item >= rule.high if rule.open_high else item > rule.high)
        if low_bad or high_bad:
            bounds = f"{'(' if rule.open_low or rule.low is None else '['}{'-inf' if rule.low is None else rule.low}, "
            bounds += f"{'inf' if rule.high is None else rule.high}{')' if rule.open_high or rule.high is None else ']'}"
            raise ConfigError(f"{where} must be in {bounds}, got {item!r}" + (f" in {value!r}" if value is not item else ""))


def _check_rule(cfg: dict, dotted: str, rule: Rule, stage: str) -> None:
    found, value = lookup(cfg, dotted)
    if not found:
        if rule.required:
            raise ConfigError(f"{source_of(cfg, dotted)}: missing required key '{dotted}' (needed by {stage})")
        return
    where = f"{source_of(cfg, dotted)}: key '{dotted}'"
    require(cfg, dotted, rule.kind)
    for item in (value if isinstance(value, list) else [value]) if rule.choices else ():
        if item not in rule.choices:
            choices = ", ".join(c if isinstance(c, str) else json.dumps(c) for c in rule.choices)  # true, not True
            raise ConfigError(f"{where} is '{item}': choose one of {choices}")
    for item in value if rule.items and isinstance(value, list) else ():
        if not is_kind(item, rule.items):
            names = " or ".join(k.__name__ for k in rule.items)
            raise ConfigError(f"{where} must hold {names} values, got {type(item).__name__} {item!r}")
    if isinstance(value, list) and not value and rule.nonempty:
        raise ConfigError(f"{where} must not be empty")
    twice = sorted({item for item in value if value.count(item) > 1}) if rule.distinct and isinstance(value, list) else []
    if twice:
        raise ConfigError(f"{where} names {', '.join(map(repr, twice))} more than once: list each once")
    if rule.length is not None and isinstance(value, list) and len(value) != rule.length:
        raise ConfigError(f"{where} must hold {rule.length} values, got {len(value)}: {value!r}")
    if rule.length is None:
        _check_range(where, value, rule)


# What stage 1 writes beside the train/valid lists (processors/: FINGERPRINT_FILE, SETTINGS_FILE, preprocess.py).
STAGE1_FILES = ("inputs.json", "features.json", "meta_info.json", "skipped.txt", "mels", "audios", "clips")
STAGE1_NAMED_FILES = (("spk2id", "singers.json"), ("utt2spk", "utt2spk"))


def _cross_checks(cfg: dict, letter: str) -> None:
    """Checks that span several keys: each names the key it blames and the file that set it."""
    def fail(dotted: str, problem: str) -> None:
        raise ConfigError(f"{source_of(cfg, dotted)}: key '{dotted}' {problem}")

    pre = cfg.get("preprocess", {})
    for dotted, stages in (("preprocess.processed_dir", "pti"), ("log_dir", "t")):  # a file there: a bare [Errno 20]
        path = os.path.expanduser(str(lookup(cfg, dotted)[1])) if letter in stages else ""
        if os.path.exists(path) and not os.path.isdir(path):
            fail(dotted, f"({path!r}) is a file: it must name a folder")
    if letter in "pt":  # stage 1 writes both lists beside its own records: a shared name overwrites one of them
        lists = {key: os.path.normpath(pre[key]).casefold() for key in ("train_file", "valid_file")}
        own = {os.path.normpath(pre.get(key) or name).casefold() for key, name in STAGE1_NAMED_FILES} | set(STAGE1_FILES)
        for key, name in lists.items():
            if name in own:
                fail(f"preprocess.{key}", f"({pre[key]!r}) is a file stage 1 writes itself ({', '.join(sorted(own))})")
        if lists["train_file"] == lists["valid_file"]:
            fail("preprocess.valid_file", f"({pre['valid_file']!r}) must differ from preprocess.train_file")
    if letter in "ptie":
        rate, n_fft = pre["sample_rate"], pre["n_fft"]
        if pre["win_size"] > n_fft:
            fail("preprocess.win_size", f"({pre['win_size']}) must not exceed preprocess.n_fft ({n_fft})")
        if pre["hop_size"] > n_fft:
            fail("preprocess.hop_size", f"({pre['hop_size']}) must not exceed preprocess.n_fft ({n_fft})")
        if pre["n_mel"] > n_fft // 2 + 1:
            fail("preprocess.n_mel", f"({pre['n_mel']}) must not exceed the {n_fft // 2 + 1} FFT bins of n_fft {n_fft}")
        fmin = pre.get("fmin", 0) or 0
        fmax = rate / 2 if pre.get("fmax") is None else pre["fmax"]
        if fmax > rate / 2:
            fail("preprocess.fmax", f"({fmax}) must not exceed half the sample rate ({rate / 2:g} Hz)")
        if fmin >= fmax:
            fail("preprocess.fmin", f"({fmin}) must be below preprocess.fmax ({fmax})")
    if letter in "ti":
        dotted = "model.diffwave.noise_schedule_factors"
        start, end, steps = lookup(cfg, dotted)[1]
        if not (0 < start < end < 1):
            fail(dotted, f"must be [beta_start, beta_end, steps] with 0 < beta_start < beta_end < 1, got {[start, end, steps]}")
        if not is_kind(steps, INT) or steps < 1:
            fail(dotted, f"steps (the third value) must be an integer >= 1, got {steps!r}")


def validate(cfg: dict, stage: str) -> None:
    """Check the keys `stage` reads before any work starts: one ConfigError naming key and file.

    Unknown keys are warned about (not refused, so configs of the original toolkit keep loading),
    with the closest known key.
    """
    letter = STAGES[stage]
    for dotted, rule in SCHEMA.items():
        if letter in rule.stages:
            _check_rule(cfg, dotted, rule, stage)
    _cross_checks(cfg, letter)
    for dotted, guess in unknown_keys(cfg):
        source = source_of(cfg, dotted)
        if dotted in ELSEWHERE and WRITTEN_BY_STAGE_2.search(source):
            continue  # copied there from an older config/base.json: nothing for the user to edit
        hint = f"; {ELSEWHERE[dotted]}" if dotted in ELSEWHERE else f"; did you mean '{guess}'?" if guess else ""
        log.warning("%s: unknown config key '%s' is ignored%s", source, dotted, hint)


# Keys the code reads that neither SCHEMA nor the shipped configs name, and sections whose keys are free.
OPTIONAL_KEYS = ("config_path",)
# Keys of the original's configs that are set elsewhere here: their warning says where.
ELSEWHERE = {"log_level": "the log level is the --log_level option of run.sh and the bins"}
FREE_SECTIONS = ("dataset_path.",)
# The configs stage 2 writes: an experiment's args.json (args.<step>.json) and a checkpoint's config.json.
WRITTEN_BY_STAGE_2 = re.compile(r"(^|/)args(\.\d+)?\.json$|/epoch-\d+_step-\d+_loss-[^/]+/config\.json$")


# The configs shipped with the toolkit, whose keys count as known. A fixed list, not a glob: a user's own
# config saved under egs/ must not make its own typos known keys (tests check it against the tracked files).
SHIPPED_CONFIGS = (
    "config/base.json", "config/vocoder.json", "egs/vocoder/diffusion/exp_config_base.json",
    "egs/vocoder/diffusion/diffwave/exp_config.json", "egs/vocoder/diffusion/diffwave/exp_config_22k_hop256.json",
    "egs/vocoder/diffusion/diffwave/exp_config_44k_hop512.json", "egs/vocoder/diffusion/diffwave/demo/demo_config.json",
)


@functools.cache
def known_keys() -> frozenset[str]:
    """Every key SCHEMA names, the code reads, or a config shipped with the toolkit sets (with its parents)."""
    keys = set(SCHEMA) | set(OPTIONAL_KEYS)
    for name in SHIPPED_CONFIGS:
        try:
            data = json5.loads((REPO_ROOT / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        keys.update(dotted_keys(data) if isinstance(data, dict) else [])
    keys |= {".".join(k.split(".")[:i]) for k in list(keys) for i in range(1, k.count(".") + 1)}
    return frozenset(keys)


def unknown_keys(cfg: dict) -> list[tuple[str, str | None]]:
    """(key, closest known key or None) for each key of `cfg` that nothing reads: usually a typo."""
    known = known_keys()
    found = []
    for dotted in dotted_keys(cfg):
        parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
        if dotted in known or dotted.startswith(FREE_SECTIONS) or any(dotted.startswith(f"{f}.") for f, _ in found):
            continue
        siblings = [k for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
        guess = difflib.get_close_matches(dotted, siblings, n=1, cutoff=0.6)
        found.append((dotted, guess[0] if guess else None))
    return found


def check_dataset_paths(cfg: dict) -> None:
    """Refuse to run stage 1 while a listed dataset has a name unfit for a folder, no path, a path that is not a string,
    or the placeholder."""
    paths = cfg.get("dataset_path") or {}
    for name in cfg.get("dataset", []):
        if safe_name(name) != name:  # its metadata and its features would land in two different folders
            raise ConfigError(f"{source_of(cfg, 'dataset')}: key 'dataset' names {name!r}, not usable as a folder name (no "
                              f"'/', '\\', leading dot, space at either end, or over {MAX_NAME_BYTES} bytes): rename it, "
                              f"e.g. {safe_name(name)!r}")
        path = paths.get(name)
        if path is None:
            raise ConfigError(f"dataset '{name}' has no entry in dataset_path: add it in {source_of(cfg, 'dataset')}")
        if not isinstance(path, str):
            raise ConfigError(f"dataset_path.{name} must be a folder path (a string), got {type(path).__name__} "
                              f"{path!r}: set it in {source_of(cfg, f'dataset_path.{name}')}")
        if PLACEHOLDER in str(path) or not str(path).strip():
            top, origin = cfg.get("config_path"), source_of(cfg, f"dataset_path.{name}")
            where = f"{top} (the placeholder comes from {origin})" if origin != str(top) else top
            raise ConfigError(f"dataset '{name}' still has the placeholder path '{path}': set dataset_path.{name} in {where}, "
                              "or leave it out of 'dataset' there")
