"""JSON5 configs with `base_config` inheritance and attribute access."""

from __future__ import annotations

import json
import logging
import os
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
    """The file `child`'s `base_config` names: `~` expands, an absolute path is itself, `./x` and `../x` lie
    beside the child; any other relative name is looked for beside the child and under the repo root (the
    original's recipes name bases from the repo root: `egs/...`, `config/...`).

    A name found in both places with different contents is an error naming both, not a pick: either pick
    silently changes some user's results (a project's own `config/base.json` or the toolkit's). The working
    directory is never tried, so a config means the same wherever a stage runs.
    """
    try:
        path = Path(name).expanduser()
    except RuntimeError:  # ~user of no user
        raise ConfigError(f"{child}: base_config '{name}': no home folder for {name.split('/')[0]}") from None
    beside = [child.parent / path]
    candidates = beside if path.is_absolute() or name.startswith(("./", "../")) else [*beside, REPO_ROOT / path]
    found = list(dict.fromkeys(c.resolve() for c in candidates if c.is_file()))
    if len(found) > 1 and found[0].read_bytes() == found[1].read_bytes():  # a copy: either reads the same
        found = found[:1]
    if len(found) > 1:
        raise ConfigError(f"{child}: base_config '{name}' is both {found[0]} and {found[1]}: name one of them by its "
                          f"absolute path, or as './{name}' for the one beside this config")
    if not found:
        folders = [c for c in candidates if c.is_dir()]
        if folders:
            raise ConfigError(f"{child}: base_config '{name}' is the folder {folders[0].resolve()}: name a config file")
        where = "" if len(candidates) == 1 else f" (looked beside this config and under {REPO_ROOT})"
        raise ConfigError(f"{child}: base_config '{name}' does not exist{where}")
    return found[0]


def dotted_keys(data: dict, prefix: str = "") -> list[str]:
    """Every key at every depth, as `a`, `a.b`, `a.b.c`."""
    keys = []
    for key, value in data.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += dotted_keys(value, f"{prefix}{key}.")
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
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config ({err.strerror or err})") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON5 ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be an object")
    has_parent, parent = "base_config" in data, data.pop("base_config", None)
    sources = dict.fromkeys(dotted_keys(data), str(path))
    if has_parent:  # "" or false would silently drop the whole chain: leave the key out for no base
        if not isinstance(parent, str) or not parent.strip():
            raise ConfigError(f"{path}: key 'base_config' must be a path to a config file, got {json.dumps(parent)}")
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


def adopt_sources(cfg: dict, donor: dict, section: str) -> None:
    """Once `donor[section]` is merged into `cfg`, blame its keys on the files `donor` read them from."""
    theirs = donor.__dict__.get("_sources", {}) if isinstance(donor, AttrDict) else {}
    if isinstance(cfg, AttrDict):
        ours = cfg.__dict__.setdefault("_sources", {})
        ours.update({key: file for key, file in theirs.items() if key == section or key.startswith(f"{section}.")})


def save_config(cfg: dict, path: str | os.PathLike) -> None:
    from utils.io import atomic_write_text

    atomic_write_text(path, json.dumps(to_plain(cfg), indent=4, ensure_ascii=False))


def lookup(cfg: dict, dotted: str) -> tuple[bool, Any]:
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


def is_kind(value: Any, kind: tuple[type, ...]) -> bool:
    """isinstance where a bool is not a number (JSON `true` is not a batch size)."""
    return isinstance(value, kind) and not (isinstance(value, bool) and bool not in kind)


def require(cfg: dict, dotted: str, kind: type | tuple[type, ...]) -> Any:
    """Read `a.b.c`, check its type, and fail with one line naming the key and the file that set it."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    found, value = lookup(cfg, dotted)
    if not found:
        raise ConfigError(f"{source_of(cfg, dotted)}: missing required key '{dotted}'")
    if not is_kind(value, kinds):
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

