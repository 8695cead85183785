"""LibriTTS: English audiobooks, 24 kHz; the split follows the subset names.

Reads `<root>/<subset>/<speaker>/<chapter>/<stem>.wav` and its `<stem>.normalized.txt` (→ Text,
lines joined by spaces; empty when missing), where `<root>` is the extracted `LibriTTS/` folder or
its parent. Uid `<subset>#<speaker>#<chapter>#<stem>`; Singer = speaker id. Duration comes from the
wav header (the original decodes every file). Split: `train-*` → train, `test-*` → test; `dev-*`
subsets are not used at all (the original writes them to a valid.json that nothing reads).
Speakers are disjoint across subsets, so the test is on unseen speakers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from processors.datasets import left_out
from processors.datasets.common import descend, entry, require_found, sorted_files, subdirs

log = logging.getLogger(__name__)


def _text(wav: Path) -> str:
    """The transcript, lines joined; bytes that are not UTF-8 read as U+FFFD rather than stopping the corpus."""
    txt = wav.with_name(f"{wav.stem}.normalized.txt")
    try:
        return " ".join(txt.read_text(encoding="utf-8-sig", errors="replace").split()) if txt.is_file() else ""
    except OSError as err:
        left_out(txt, f"transcript not read ({err.strerror or err}); Text left empty")
        return ""


def _subset(folder: Path, dataset: str) -> list[dict]:
    return [entry(dataset, f"{folder.name}#{spk.name}#{chapter.name}#{wav.stem}", wav, spk.name, Text=_text(wav))
            for spk in subdirs(folder) for chapter in subdirs(spk) for wav in sorted_files(chapter, "*.wav")]


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    top = descend(root, "LibriTTS")
    subsets = subdirs(top)
    train = [e for s in subsets if s.name.startswith("train") for e in _subset(s, dataset)]
    test = [e for s in subsets if s.name.startswith("test") for e in _subset(s, dataset)]
    dev = [s.name for s in subsets if s.name.startswith("dev")]
    if dev:
        log.info("%s: %s not used (no validation split beyond test)", top, ", ".join(dev))
    require_found(train + test, top, "<root>/{train,test}-<name>/<speaker>/<chapter>/<stem>.wav")
    return train, test
