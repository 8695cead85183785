"""VCTK 0.92: about 110 English speakers, 48 kHz FLAC, two microphones.

Reads `<root>/wav48_silence_trimmed/<spk>/<spk>_<NNN>_mic<1|2>.flac` (other files such as log.txt
are ignored) and `<root>/speaker-info.txt` for the gender, where `<root>` is the corpus folder
(`VCTK-Corpus-0.92/`) or its parent. The 0.80 release (`wav48/*.wav`) is refused by name.
Singer `female_<spk>` / `male_<spk>` (the bare id when the speaker has no gender listed); Uid `<Singer>#<NNN>_mic<k>`
(`female_p225#001_mic1`); a converted copy beside a .flac (`p225_001_mic1.wav`) is left out.
Test: per speaker, the first 3 files of the **sorted** listing (so `001_mic1`, `001_mic2`, `002_mic1`); every
speaker is in both splits. Transcripts not read.
"""

from __future__ import annotations

from pathlib import Path

from processors.datasets import DatasetError
from processors.datasets.common import audio_in, entry, one_per_stem, require_found, subdirs

TEST_PER_SPEAKER = 3
AUDIO = "wav48_silence_trimmed"
OLD_AUDIO = "wav48"  # VCTK 0.80: other file names, no mic suffix, 0.92's trimming missing
GENDERS = {"F": "female", "M": "male"}


def genders(info: Path) -> dict[str, str]:
    """speaker id -> female/male from speaker-info.txt; tolerant of missing fields, odd ids (s5)
    and of ids written without their `p` (older releases)."""
    found = {}
    lines = info.read_text(encoding="utf-8", errors="replace").splitlines() if info.is_file() else []
    for line in lines:
        fields = line.split()
        if not fields or fields[0].upper() == "ID":
            continue
        speaker = f"p{fields[0]}" if fields[0].isdigit() else fields[0]
        gender = next((GENDERS[f.upper()] for f in fields[1:3] if f.upper() in GENDERS), None)
        if gender:
            found[speaker] = gender
    return found


def corpus_root(root: Path) -> Path:
    """`root`, or the one folder inside it holding the 0.92 layout (`dataset_path` at the download's parent)."""
    if (root / AUDIO).is_dir():
        return root
    folders = subdirs(root)
    inside = [d for d in folders if _holds(d, AUDIO)]
    if len(inside) == 1:
        return inside[0]
    if inside:
        raise DatasetError(f"{root}: {len(inside)} VCTK folders inside ({', '.join(d.name for d in inside)}); "
                           "set dataset_path to one of them")
    old = [d for d in [root, *folders] if _holds(d, OLD_AUDIO)]
    if old:
        raise DatasetError(f"{old[0]}: VCTK 0.80 layout ({OLD_AUDIO}/) found; this toolkit reads the 0.92 layout "
                           f"({AUDIO}/): download VCTK-Corpus-0.92")
    return root


def _holds(folder: Path, name: str) -> bool:
    """Whether `folder` has the sub-folder `name`; a sibling we may not read (lost+found on a mount) has none."""
    try:
        return (folder / name).is_dir()
    except PermissionError:
        return False


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    root = corpus_root(root)
    gender = genders(root / "speaker-info.txt")
    train, test = [], []
    for folder in subdirs(root / AUDIO):
        spk = folder.name
        singer = f"{gender[spk]}_{spk}" if spk in gender else spk
        files = one_per_stem(audio_in(folder), ".flac")
        items = [entry(dataset, f"{singer}#{f.stem.removeprefix(spk + '_')}", f, singer) for f in files]
        test += items[:TEST_PER_SPEAKER]
        train += items[TEST_PER_SPEAKER:]
    require_found(train + test, root, "<root>/wav48_silence_trimmed/<spk>/<spk>_<NNN>_mic<k>.flac (VCTK 0.92)")
    return train, test
