"""Any folder of audio (wav/flac/ogg/...), at any depth.

Uid = the path below the root with separators turned into `_`, without repeating the speaker
folder when the file name starts with it (`spk1/spk1_007.wav` -> `spk1_007`), through the one
naming rule (so `a.wav` beside `a.flac`, or `sub/b.wav` beside `sub_b.wav`, get distinct Uids); speaker = the first folder
below the root (or the dataset name for files at the top). Every 20th utterance, at least
one, is test, so small custom sets still validate.
"""

from __future__ import annotations

from pathlib import Path

from processors.audio import AUDIO_EXTENSIONS, list_audio
from processors.datasets.common import entry, require_found
from utils.io import unique_names

TEST_EVERY = 20


def _uid(relative: Path) -> str:
    """The path's parts joined by `_`, leaving out the speaker folder when the file name already starts with it.

    `spk1/spk1_007.wav` gives `spk1_007` (not `spk1_spk1_007`); `spk1/007.wav` gives `spk1_007`.
    """
    parts = relative.with_suffix("").parts
    if len(parts) > 1 and parts[-1].startswith(f"{parts[0]}_"):
        parts = parts[1:]
    return "_".join(parts)


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    entries = []
    paths = [Path(p) for p in list_audio(root)]
    uids = unique_names([(_uid(p.relative_to(root)), p.relative_to(root).as_posix()) for p in paths])
    for path, uid in zip(paths, uids, strict=True):
        relative = path.relative_to(root)
        speaker = relative.parts[0] if len(relative.parts) > 1 else dataset
        entries.append(entry(dataset, uid, path, speaker))
    require_found(entries, root, f"audio files ({', '.join(AUDIO_EXTENSIONS)}) at any depth")
    return every_nth_test(entries)


def every_nth_test(entries: list[dict], n: int = TEST_EVERY) -> tuple[list[dict], list[dict]]:
    """(train, test): every n-th entry is test, at least the last one; train keeps every entry when it would be empty.

    By index, not by comparing entries: linear in the corpus size.
    """
    test_at = set(range(n - 1, len(entries), n)) or {len(entries) - 1}
    test = [entries[i] for i in sorted(test_at)]
    train = [e for i, e in enumerate(entries) if i not in test_at] or entries
    return train, test
