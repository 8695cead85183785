"""PopBuTFy: English pop, each song sung by one singer in Amateur and Professional versions.

Reads `<root>/<S>#singing#<Song>/<S>#singing#<Song>_<n>.mp3` (or `.wav`; mp3 wins when both exist),
where `<root>` is the download's `data/` folder or the download root above it. Singer `<S>`
(`Male2`); Song = last `#` piece (`Lemon_Tree_Professional`); Uid `<S>#<Song>#<n>`: the utterance
number is part of the Uid (the original leaves it out, so every clip of a song overwrote the same
feature file). Test: every clip of the Professional versions (Female1, you_are_my_sunshine),
(Female4, Someone_Like_You), (Male2, Lemon_Tree), (Male5, can_you_feel_the_love_tonight);
the Amateur versions stay in train.
"""

from __future__ import annotations

from pathlib import Path

from processors.datasets.common import audio_in, descend, entry, list_unused, require_found, split_by, subdirs

TEST = {("Female1", "you_are_my_sunshine_Professional"), ("Female4", "Someone_Like_You_Professional"),
        ("Male2", "Lemon_Tree_Professional"), ("Male5", "can_you_feel_the_love_tonight_Professional")}


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    data = descend(root, "data")
    entries = []
    for folder in (f for f in subdirs(data) if "#" in f.name):
        singer, song = folder.name.split("#")[0], folder.name.split("#")[-1]
        clips = {}  # stem -> file; mp3 sorts after wav here, so it wins when both exist, as in the original
        for path in sorted(audio_in(folder), key=lambda p: p.suffix.lower() == ".mp3"):
            if path.stem.startswith(f"{folder.name}_") and path.suffix.lower() in (".mp3", ".wav"):
                clips[path.stem] = path
        for stem in sorted(clips):
            number = stem.rsplit("_", 1)[1]
            entries.append(entry(dataset, f"{singer}#{song}#{number}", clips[stem], singer, Song=song))
    require_found(entries, data, "<root>/data/<S>#singing#<Song>/<S>#singing#<Song>_<n>.mp3 (or <root> = data/)")
    list_unused(subdirs(data), entries, "not named <S>#singing#<Song>/<S>#singing#<Song>_<n>.mp3 or .wav (or a .wav "
                "beside the .mp3 of its name); not used")
    return split_by(entries, lambda e: (e["Singer"], e["Song"]) in TEST)
