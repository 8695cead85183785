"""JSON5 configs with `base_config` inheritance and attribute access."""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import json5

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = "[dataset path]"


class ConfigError(ValueError):
    """A config problem; the message names the key and the file."""


class AttrDict(dict):
    """A dict whose keys also read as attributes (`cfg.preprocess.hop_size`)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no key '{key}'") from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __delattr__(self, key: str) -> None:
        del self[key]

    def __getstate__(self) -> dict:
        return dict(self)

    def __setstate__(self, state: dict) -> None:
        self.update(state)


def to_attrdict(obj: Any) -> Any:
    if isinstance(obj, dict):
        return AttrDict({k: to_attrdict(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return [to_attrdict(v) for v in obj]
    return obj


def to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    return obj


def merge(base: dict, override: dict) -> dict:
    """Recursive merge: dicts merge, lists and scalars in `override` replace."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_parent(name: str, child: Path) -> Path:
    """Parents resolve against the repo root (as the original does), then the child's folder."""
    for candidate in (REPO_ROOT / name, child.parent / name, Path(name)):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{child}: base_config '{name}' does not exist")


def _dotted(data: dict, prefix: str = "") -> list[str]:
    """Every key at every depth, as `a`, `a.b`, `a.b.c`."""
    keys = []
    for key, value in data.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _dotted(value, f"{prefix}{key}.")
    return keys


def _join_surrogates(obj: Any) -> Any:
    """json5 reads a `\\ud83d\\ude00` escape pair (as Python's json.dump writes emoji) as two halves: join them."""
    if isinstance(obj, str):
        if not any("\ud800" <= c <= "\udfff" for c in obj):
            return obj
        return obj.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
    if isinstance(obj, dict):
        return {_join_surrogates(k): _join_surrogates(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_surrogates(v) for v in obj]
    return obj


def _read(path: Path, chain: tuple[Path, ...]) -> tuple[dict, dict[str, str]]:
    """The merged config of `path` and, per dotted key, the file that set it."""
    if path in chain:
        loop = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{path}: base_config loops ({loop})")
    try:
        data = _join_surrogates(json5.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON5 ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be an object")
    parent = data.pop("base_config", None)
    sources = dict.fromkeys(_dotted(data), str(path))
    if parent:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: key 'base_config' must be a path string, got {type(parent).__name__}")
        base, base_sources = _read(_resolve_parent(parent, path), (*chain, path))
        data, sources = merge(base, data), {**base_sources, **sources}
    return data, sources


def load_config(path: str | os.PathLike) -> AttrDict:
    """Load a JSON5 config, merged over its `base_config` chain."""
    path = Path(path).resolve()
    data, sources = _read(path, ())
    cfg = to_attrdict(data)
    cfg["config_path"] = str(path)
    object.__setattr__(cfg, "_sources", sources)  # an attribute, not a key: never saved with the config
    return cfg


def source_of(cfg: dict, dotted: str) -> str:
    """The file that set `dotted` (the top config file for keys it does not have)."""
    sources = cfg.__dict__.get("_sources", {}) if isinstance(cfg, AttrDict) else {}
    return sources.get(dotted) or str(cfg.get("config_path", "config"))


def save_config(cfg: dict, path: str | os.PathLike) -> None:
    from utils.io import atomic_write_text

    atomic_write_text(path, json.dumps(to_plain(cfg), indent=4, ensure_ascii=False))


def _lookup(cfg: dict, dotted: str) -> tuple[bool, Any]:
    """(found, value) of `a.b.c`; a section that is not an object is a ConfigError."""
    node: Any = cfg
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict):
            above = ".".join(parts[:depth])
            raise ConfigError(f"{source_of(cfg, above)}: key '{above}' must be an object, got {type(node).__name__} {node!r}")
        if part not in node:
            return False, None
        node = node[part]
    return True, node


def _is(value: Any, kind: tuple[type, ...]) -> bool:
    """isinstance where a bool is not a number (JSON `true` is not a batch size)."""
    return isinstance(value, kind) and not (isinstance(value, bool) and bool not in kind)


def require(cfg: dict, dotted: str, kind: type | tuple[type, ...]) -> Any:
    """Read `a.b.c`, check its type, and fail with one line naming the key and the file that set it."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    found, value = _lookup(cfg, dotted)
    if not found:
        raise ConfigError(f"{source_of(cfg, dotted)}: missing required key '{dotted}'")
    if not _is(value, kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise ConfigError(f"{source_of(cfg, dotted)}: key '{dotted}' must be {names}, got {type(value).__name__} {value!r}")
    return value


INT, NUMBER, STR, LIST, NONE = (int,), (int, float), (str,), (list,), (type(None),)
BOOL_OR_AUTO = (bool, str)  # true, false or "auto"


def bool_or_auto(value: bool | str, key: str, auto: bool) -> bool:
    """A BOOL_OR_AUTO setting: true / false, or `auto` (the caller's default for this device) for "auto"."""
    if value == "auto":
        return auto
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key} must be true, false or \"auto\", got {value!r}")
GENERATORS = ("diffwave",)
SAMPLER_NAMES = ("fast", "full", "ddim", "searched")


@dataclass(frozen=True)
class Rule:
    """What one key must hold, and for which stages (p: preprocess, t: train, i: inference).

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


def positive(kind: tuple[type, ...], stages: str, required: bool = True, items: tuple[type, ...] = ()) -> Rule:
    return Rule(kind, stages, required, low=0, open_low=True, items=items)


def below_one(stages: str, required: bool = True) -> Rule:
    """A decay or momentum: 0 <= value < 1."""
    return Rule(NUMBER, stages, required, low=0, high=1, open_high=True)


def switch(stages: str) -> Rule:
    """An optional true / false / "auto" setting."""
    return Rule(BOOL_OR_AUTO, stages, required=False, choices=(True, False, "auto"))


# torch.compile's modes; "reduce-overhead" replays CUDA graphs, "max-autotune" also tunes its matmuls.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

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
    "dataset": Rule(LIST, "pt", items=STR),
    "dataset_path": Rule((dict,), "p"),
    "use_custom_dataset": Rule(LIST, "p", required=False, items=STR),
    "log_dir": Rule(STR, "t"),
    "preprocess.processed_dir": Rule(STR, "pti"),
    "preprocess.train_file": Rule(STR, "pt"),
    "preprocess.valid_file": Rule(STR, "pti"),
    **{f"preprocess.{k}": positive(INT, "pti") for k in ("sample_rate", "n_fft", "win_size", "hop_size", "n_mel")},
    "preprocess.fmin": Rule(NUMBER, "pti", required=False, low=0),
    "preprocess.fmax": Rule(NUMBER + NONE, "pti", required=False, low=0, open_low=True),
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
    "train.save_checkpoints_steps": Rule(INT, "t", required=False, low=0),
    "train.adamw.lr": positive(NUMBER, "t"),
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
    "train.channels_last": switch("t"),
    "train.adamw.fused": switch("t"),
    "inference.batch_size": positive(INT, "i", required=False),
    "inference.engine": Rule(STR, "i", required=False, choices=("auto", "fused", "tiled", "plain")),
    "inference.precision": Rule(STR, "i", required=False, choices=("auto", "fp32", "fp16", "bf16")),
    "inference.compile": switch("i"),
    "inference.cuda_graph": switch("i"),
    "inference.gpu_memory_gib": Rule(NUMBER + NONE, "i", required=False, low=0, open_low=True),
    "inference.sampler": Rule(STR, "i", required=False, choices=SAMPLER_NAMES),
}
STAGES = {"preprocess": "p", "train": "t", "inference": "i"}


def _check_range(where: str, value: Any, rule: Rule) -> None:
    values = value if isinstance(value, list) else [value]
    for item in values:
        if not _is(item, NUMBER):
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
    found, value = _lookup(cfg, dotted)
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
        if not _is(item, rule.items):
            names = " or ".join(k.__name__ for k in rule.items)
            raise ConfigError(f"{where} must hold {names} values, got {type(item).__name__} {item!r}")
    if isinstance(value, list) and not value and rule.nonempty:
        raise ConfigError(f"{where} must not be empty")
    if rule.length is not None and isinstance(value, list) and len(value) != rule.length:
        raise ConfigError(f"{where} must hold {rule.length} values, got {len(value)}: {value!r}")
    if rule.length is None:
        _check_range(where, value, rule)


def _cross_checks(cfg: dict, letter: str) -> None:
    """Checks that span several keys: each names the key it blames and the file that set it."""
    def fail(dotted: str, problem: str) -> None:
        raise ConfigError(f"{source_of(cfg, dotted)}: key '{dotted}' {problem}")

    pre = cfg.get("preprocess", {})
    if letter in "pti":
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
        start, end, steps = _lookup(cfg, dotted)[1]
        if not (0 < start < end < 1):
            fail(dotted, f"must be [beta_start, beta_end, steps] with 0 < beta_start < beta_end < 1, got {[start, end, steps]}")
        if not _is(steps, INT) or steps < 1:
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
        hint = f"; did you mean '{guess}'?" if guess else ""
        log.warning("%s: unknown config key '%s' is ignored%s", source_of(cfg, dotted), dotted, hint)


# Keys the code reads that neither SCHEMA nor the shipped configs name, and sections whose keys are free.
OPTIONAL_KEYS = (
    "config_path", "train.tf32", "train.eval_seconds", "train.eval_utterances",
    "train.run_eval", "train.dataloader", "inference.steps", "inference.mel_convention", "inference.mel_stats",
    "inference.chunk_size", "inference.cache_gib", "inference.tile", "preprocess.spk2id", "preprocess.utt2spk",
)
FREE_SECTIONS = ("dataset_path.",)


@functools.cache
def known_keys() -> frozenset[str]:
    """Every key SCHEMA names, the code reads, or a config shipped with the toolkit sets (with its parents)."""
    keys = set(SCHEMA) | set(OPTIONAL_KEYS)
    for path in sorted(REPO_ROOT.glob("config/*.json")) + sorted(REPO_ROOT.glob("egs/**/*.json")):
        try:
            data = json5.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        keys.update(_dotted(data) if isinstance(data, dict) else [])
    keys |= {".".join(k.split(".")[:i]) for k in list(keys) for i in range(1, k.count(".") + 1)}
    return frozenset(keys)


def unknown_keys(cfg: dict) -> list[tuple[str, str | None]]:
    """(key, closest known key or None) for each key of `cfg` that nothing reads: usually a typo."""
    known = known_keys()
    found = []
    for dotted in _dotted(cfg):
        parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
        if dotted in known or dotted.startswith(FREE_SECTIONS) or any(dotted.startswith(f"{f}.") for f, _ in found):
            continue
        siblings = [k for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
        guess = difflib.get_close_matches(dotted, siblings, n=1, cutoff=0.6)
        found.append((dotted, guess[0] if guess else None))
    return found


def check_dataset_paths(cfg: dict) -> None:
    """Refuse to run stage 1 while a listed dataset still has the placeholder path."""
    paths = cfg.get("dataset_path") or {}
    for name in cfg.get("dataset", []):
        path = paths.get(name)
        if path is None:
            raise ConfigError(f"dataset '{name}' has no entry in dataset_path: add it in {source_of(cfg, 'dataset')}")
        if PLACEHOLDER in str(path) or not str(path).strip():
            top, origin = cfg.get("config_path"), source_of(cfg, f"dataset_path.{name}")
            where = f"{top} (the placeholder comes from {origin})" if origin != str(top) else top
            raise ConfigError(f"dataset '{name}' still has the placeholder path '{path}': set dataset_path.{name} in {where}")
