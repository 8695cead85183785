"""JSON5 configs with `base_config` inheritance and attribute access."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import json5

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


def _read(path: Path, chain: tuple[Path, ...]) -> dict:
    if path in chain:
        loop = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{path}: base_config loops ({loop})")
    try:
        data = json5.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except ValueError as err:
        raise ConfigError(f"{path}: not valid JSON5 ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be an object")
    parent = data.pop("base_config", None)
    if parent:
        data = merge(_read(_resolve_parent(parent, path), (*chain, path)), data)
    return data


def load_config(path: str | os.PathLike) -> AttrDict:
    """Load a JSON5 config, merged over its `base_config` chain."""
    path = Path(path).resolve()
    cfg = to_attrdict(_read(path, ()))
    cfg["config_path"] = str(path)
    return cfg


def save_config(cfg: dict, path: str | os.PathLike) -> None:
    from utils.io import atomic_write_text

    atomic_write_text(path, json.dumps(to_plain(cfg), indent=4, ensure_ascii=False))


def require(cfg: dict, dotted: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    """Read `a.b.c`, check its type, and fail with one line naming key and file."""
    node: Any = cfg
    source = where or cfg.get("config_path", "config")
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{source}: missing required key '{dotted}'")
        node = node[part]
    ok = isinstance(node, kind) and not (isinstance(node, bool) and bool not in _as_tuple(kind))
    if not ok:
        names = "/".join(k.__name__ for k in _as_tuple(kind))
        raise ConfigError(f"{source}: key '{dotted}' must be {names}, got {type(node).__name__} {node!r}")
    return node


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def check_dataset_paths(cfg: dict) -> None:
    """Refuse to run stage 1 while a listed dataset still has the placeholder path."""
    paths = cfg.get("dataset_path") or {}
    for name in cfg.get("dataset", []):
        path = paths.get(name)
        if path is None:
            raise ConfigError(f"dataset '{name}' has no entry in dataset_path: add it in {cfg.get('config_path')}")
        if PLACEHOLDER in str(path) or not str(path).strip():
            raise ConfigError(
                f"dataset '{name}' still has the placeholder path '{path}': "
                f"set dataset_path.{name} in {cfg.get('config_path')}"
            )
