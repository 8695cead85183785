"""VCTK 0.92: about 110 English speakers, 48 kHz FLAC, two microphones.

Reads `<root>/wav48_silence_trimmed/<spk>/<spk>_<NNN>_mic<1|2>.flac` (other files such as log.txt
are ignored) and `<root>/speaker-info.txt` for the gender. Singer `female_<spk>` / `male_<spk>`
(the bare id when the speaker has no gender listed); Uid `<Singer>#<NNN>_mic<k>`
(`female_p225#001_mic1`). Test: per speaker, the first 3 files of the **sorted** listing
(so `001_mic1`, `001_mic2`, `002_mic1`); every speaker is in both splits. Transcripts not read.
"""

from __future__ import annotations

from pathlib import Path

from processors.datasets.common import audio_in, entry, require_found, subdirs

TEST_PER_SPEAKER = 3
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


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    gender = genders(root / "speaker-info.txt")
    train, test = [], []
    for folder in subdirs(root / "wav48_silence_trimmed"):
        spk = folder.name
        singer = f"{gender[spk]}_{spk}" if spk in gender else spk
        items = [entry(dataset, f"{singer}#{f.stem.removeprefix(spk + '_')}", f, singer) for f in audio_in(folder)]
        test += items[:TEST_PER_SPEAKER]
        train += items[TEST_PER_SPEAKER:]
    require_found(train + test, root, "<root>/wav48_silence_trimmed/<spk>/<spk>_<NNN>_mic<k>.flac (VCTK 0.92)")
    return train, test
