"""Corpus parsers, registered by name.

A parser is `parse(root, dataset, work_dir) -> (train, test)`: it reads the raw corpus at
`root` (never writing there), may write derived clips under `work_dir`
(= processed_dir/<dataset>), and returns utterance entries with `Dataset`, `Uid`, `Path`,
`Duration`, `Singer` (plus `Song`/`Text` where the corpus has them). Listings are sorted, so
the split is the same on every machine. Finding no utterance is a DatasetError.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

Entry = dict
Parser = Callable[[Path, str, Path], tuple[list[Entry], list[Entry]]]

CORPORA = (
    "csd", "kising", "m4singer", "nus48e", "opencpop", "opensinger", "opera",
    "pjs", "popbutfy", "popcs", "ljspeech", "vctk", "libritts",
)
CUSTOM = "custom"


class DatasetError(ValueError):
    """A corpus that cannot be parsed; the message names the folder and the expected layout."""


log = logging.getLogger(__name__)
_LEFT_OUT: ContextVar[list[str] | None] = ContextVar("left_out", default=None)


def left_out(path: str | os.PathLike, reason: str) -> None:
    """A file the parser does not use: logged, and listed by stage 1 in skipped.txt with the reason."""
    line = f"{path}: {reason}"
    log.warning("left out %s", line)
    found = _LEFT_OUT.get()
    if found is not None:
        found.append(line)


@contextmanager
def collecting_left_out() -> Iterator[list[str]]:
    """The `left_out` lines of everything parsed inside the block."""
    found: list[str] = []
    token = _LEFT_OUT.set(found)
    try:
        yield found
    finally:
        _LEFT_OUT.reset(token)


def parser_name(dataset: str, custom: list[str] | tuple[str, ...] = ()) -> str:
    if dataset in custom:
        return CUSTOM
    if dataset.startswith("opencpo"):
        return "opencpop"
    if dataset.lower() in CORPORA:
        return dataset.lower()
    known = ", ".join(CORPORA)
    raise DatasetError(
        f"unknown dataset '{dataset}': known corpora are {known}; list any other folder of audio in use_custom_dataset"
    )


def test_rule(dataset: str, custom: list[str] | tuple[str, ...] = ()) -> str:
    """The parser's test rule, as its docstring states it (the `Test:` or `Split:` sentence)."""
    doc = importlib.import_module(f"processors.datasets.{parser_name(dataset, custom)}").__doc__ or ""
    doc = re.sub(r"\*\*|`", "", " ".join(doc.split()))  # plain text: no markdown emphasis or code marks
    found = re.search(r"\b(?:Test|Split): (.+?\.)(?:\s|$)", doc)
    return found.group(1) if found else "see its parser's docstring"


def get_parser(dataset: str, custom: list[str] | tuple[str, ...] = ()) -> Parser:
    module = importlib.import_module(f"processors.datasets.{parser_name(dataset, custom)}")
    return module.parse
