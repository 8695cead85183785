"""Fixture corpora in each dataset's real on-disk layout, with tiny generated audio.

Every builder takes an empty folder, lays out the corpus as its download does (names, nesting,
metadata files, transcripts, official lists, the files our parsers must ignore) and returns the
folder that `dataset_path` is documented to point at. `EXPECTED` holds what each parser must find.
Audio is written at the corpus's native rate and format (flac for VCTK, mp3 for PopBuTFy).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf


def tone(seconds: float, sr: int, freq: float = 220.0, seed: int = 0) -> np.ndarray:
    """A sine with a little noise: loud enough to count as sound for the slicers."""
    t = np.arange(round(seconds * sr)) / sr
    noise = np.random.default_rng(seed).normal(0, 0.01, t.shape)
    return (0.4 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def quiet(seconds: float, sr: int) -> np.ndarray:
    return np.zeros(round(seconds * sr), np.float32)


def write_audio(path: Path, audio: np.ndarray | float, sr: int) -> Path:
    """Write `audio` (or a tone of that many seconds) in the format the suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(audio, np.ndarray):
        audio = tone(audio, sr, seed=len(path.name))
    sf.write(str(path), audio, sr, format={".mp3": "MP3", ".flac": "FLAC"}.get(path.suffix, "WAV"))
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def csd(base: Path) -> Path:
    """Two lyric lines per song over 7 notes; the first note starts at 0.05 s (clamp case)."""
    sr = 44100
    for lang, songs, sylls in (("english", ("en001a", "en004a", "en004b"), "twin kle twin kle lit tle star"),
                               ("korean", ("kr013a",), "나 비 야 나 비 야 이")):
        tokens = sylls.split()
        rows = [f"{0.05 + 0.3 * i:.2f},{0.35 + 0.3 * i:.2f},{60 + i},{s}" for i, s in enumerate(tokens)]
        for song in songs:
            write_audio(base / lang / "wav" / f"{song}.wav", 2.6, sr)
            write_text(base / lang / "txt" / f"{song}.txt", " ".join(tokens[:4]) + "\n\n" + " ".join(tokens[4:]) + "\n")
            write_text(base / lang / "csv" / f"{song}.csv", "start,end,pitch,syllable\n" + "\n".join(rows) + "\n")
            write_text(base / lang / "lyric" / f"{song}.txt", sylls)
        write_text(base / lang / "metadata.json", "{}")
    return base


def kising(base: Path) -> Path:
    for song, stems in (("421", ("0001", "0040")), ("422", ("0001",)), ("424", ("0013",)),
                        ("431", ("0026",)), ("440", ("0003",))):
        for stem in stems:
            write_audio(base / "clean" / song / f"{stem}.wav", 0.5, 44100)
    return base / "clean"


def m4singer(base: Path) -> Path:
    items = ["Alto-1#美错#0000", "Alto-1#美错#0001", "Bass-1#十年#0000", "Soprano-2#同桌的你#0000",
             "Tenor-5#爱笑的眼睛#0003", "Tenor-1#Let It Go#0000", "Alto-2#a_b-c d#0002"]
    for item in items:
        singer, song, number = item.split("#")
        write_audio(base / f"{singer}#{song}" / f"{number}.wav", 0.4, 48000)
        write_text(base / f"{singer}#{song}" / f"{number}.TextGrid", "")
    meta = [{"item_name": name, "txt": "", "phs": []} for name in [*items, "Tenor-2#没有#0000"]]
    write_text(base / "meta.json", json.dumps(meta, ensure_ascii=False))
    return base


def nus48e(base: Path) -> Path:
    """ADIZ read 01 has one long pause after 6.5 s of sound, so the slicer cuts it in two."""
    sr = 44100
    write_audio(base / "ADIZ" / "read" / "01.wav", np.concatenate([tone(6.5, sr), quiet(1, sr), tone(1, sr)]), sr)
    for singer, style, song in (("ADIZ", "sing", "01"), ("JLEE", "read", "08"), ("MCUR", "sing", "10"),
                                ("SAMF", "sing", "18"), ("SAMF", "read", "18")):
        write_audio(base / singer / style / f"{song}.wav", 1.0, sr)
        write_text(base / singer / style / f"{song}.txt", "0 1 sil\n")
    write_text(base / "README.txt", "NUS-48E")
    return base


def opencpop(base: Path) -> Path:
    seg = base / "segments"
    for uid in ("2001000001", "2001000002", "2002000001"):
        write_audio(seg / "wavs" / f"{uid}.wav", 0.5, 44100)
    write_text(seg / "train.txt", "2001000001|感受停在我|g an sh ou|C4|0.1\n2001000002|发端的指尖|f a|D4|0.2\n"
                                  "2001000009|缺失|q ue|E4|0.1\n")
    write_text(seg / "test.txt", "2002000001|你好|n i h ao|C4|0.1\n")
    write_text(seg / "transcriptions.txt", "")
    write_audio(base / "wavs" / "2001.wav", 1.0, 44100)
    (base / "midis").mkdir()
    return base


def opensinger(base: Path) -> Path:
    sr = 24000
    for gender, folder, numbers in (("Man", "0_大鱼", (0, 1)), ("Man", "21_丑八怪", (0,)),
                                    ("Man", "3_see_you_again", (0,)), ("Woman", "39_mojito", (0,)),
                                    ("Woman", "40_易燃易爆炸", (0,)), ("Woman", "0_大鱼", (0,))):
        for n in numbers:
            write_audio(base / f"{gender}Raw" / folder / f"{folder}_{n}.wav", 0.6, sr)
            write_text(base / f"{gender}Raw" / folder / f"{folder}_{n}.txt", "歌词")
    write_audio(base / "WomanRaw" / "41_long song" / "41_long song_0.wav", quiet(30.5, sr), sr)
    write_text(base / "LICENSE", "")
    return base


def opera(base: Path) -> Path:
    """fem_01/neg_1 has a long pause after 6 s of sound: two clips."""
    sr, mono = 44100, base / "monophonic"
    write_audio(mono / "chinese" / "fem_01" / "neg_1.wav", np.concatenate([tone(6, sr), quiet(1, sr), tone(1, sr)]), sr)
    for lang, singer, song in (("chinese", "male_02", "neg_1"), ("western", "fem_12", "pos_3"),
                               ("western", "fem_12", "neg_1"), ("western", "male_11", "pos_2"),
                               ("western", "male_13", "pos_1")):
        write_audio(mono / lang / singer / f"{song}.wav", 1.0, sr)
    write_text(mono / "chinese" / "male_02" / "notes.txt", "not audio")
    write_audio(base / "polyphonic" / "chinese" / "x.wav", 0.3, sr)
    write_text(base / "labels.xlsx", "")
    return mono


def pjs(base: Path) -> Path:
    """Songs of 0.3 s silence + 1.5 s sound + 0.3 s silence; speech and noise files to be ignored."""
    sr, top = 48000, base / "PJS_corpus_ver1.1"
    song_audio = np.concatenate([quiet(0.3, sr), tone(1.5, sr), quiet(0.3, sr)])
    for song in ("pjs001", "pjs002", "pjs003", "pjs004", "pjs010"):
        write_audio(top / song / f"{song}_song.wav", song_audio, sr)
        write_audio(top / song / f"{song}_speech.wav", 0.3, sr)
        for ext in ("lab", "mid", "musicxml", "txt"):
            write_text(top / song / f"{song}.{ext}", "")
    write_audio(top / "background_noise" / "noise.wav", 0.3, sr)
    return base


def popbutfy(base: Path) -> Path:
    for folder, numbers, ext in (("Female1#singing#you_are_my_sunshine_Professional", (0, 1), "mp3"),
                                 ("Female1#singing#you_are_my_sunshine_Amateur", (0,), "mp3"),
                                 ("Male2#singing#Lemon_Tree_Professional", (0, 1), "mp3"),
                                 ("Male5#singing#can_you_feel_the_love_tonight_Professional", (0,), "wav"),
                                 ("Female4#singing#Someone_Like_You_Amateur", (0,), "mp3")):
        for n in numbers:
            write_audio(base / "data" / folder / f"{folder}_{n}.{ext}", 0.6, 44100)
    write_text(base / "text_labels", "")
    write_text(base / "TERMS_OF_ACCESS", "")
    return base / "data"


def popcs(base: Path) -> Path:
    for song, numbers in (("明天会更好", ("0000", "0001")), ("欧若拉", ("0000",)), ("Let-It-Go", ("0000",)),
                          ("小 幸运", ("0003",))):
        for n in numbers:
            write_audio(base / "popcs" / f"popcs-{song}" / f"{n}_wf0.wav", 0.5, 24000)
            for extra in (f"{n}_ph.txt", f"{n}.TextGrid", f"{n}.txt"):
                write_text(base / "popcs" / f"popcs-{song}" / extra, "")
    return base / "popcs"


def ljspeech(base: Path) -> Path:
    root = base / "LJSpeech-1.1"
    for i in range(1, 22):
        write_audio(root / "wavs" / f"LJ001-{i:04d}.wav", 0.3, 22050)
    write_text(root / "metadata.csv", "LJ001-0001|Printing|Printing\n")
    write_text(root / "README", "")
    return root


SPEAKER_INFO = """ID  AGE  GENDER  ACCENTS  REGION COMMENTS
p225  23  F    English    Southern  England
p280  25  F    France     (mic2 files unavailable)
p376  M  Indian
s5  22  F    British   English
"""


def vctk(base: Path) -> Path:
    root = base / "VCTK-Corpus-0.92"
    for spk in ("p225", "s5", "p376", "p999"):
        for utt in ("002_mic2", "001_mic1", "002_mic1", "001_mic2"):
            write_audio(root / "wav48_silence_trimmed" / spk / f"{spk}_{utt}.flac", 0.3, 48000)
        write_text(root / "txt" / spk / f"{spk}_001.txt", "Please call Stella.")
    write_text(root / "wav48_silence_trimmed" / "log.txt", "")
    write_text(root / "speaker-info.txt", SPEAKER_INFO)
    write_text(root / "update.txt", "")
    return root


def libritts(base: Path) -> Path:
    root = base / "LibriTTS"
    for subset, spk, chap, utt in (("train-clean-100", "103", "1241", "000000_000001"),
                                   ("train-clean-100", "103", "1241", "000000_000002"),
                                   ("test-clean", "1089", "134686", "000001_000000"),
                                   ("dev-clean", "84", "121123", "000008_000000")):
        stem = f"{spk}_{chap}_{utt}"
        write_audio(root / subset / spk / chap / f"{stem}.wav", 0.5, 24000)
        write_text(root / subset / spk / chap / f"{stem}.normalized.txt", f"Text of {stem}.")
        write_text(root / subset / spk / chap / f"{stem}.original.txt", f"TEXT of {stem}")
        write_text(root / subset / spk / chap / f"{spk}_{chap}.trans.tsv", "")
    for name in ("BOOKS.txt", "CHAPTERS.txt", "SPEAKERS.txt", "speakers.tsv"):
        write_text(root / name, "")
    return root


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "csd": csd, "kising": kising, "m4singer": m4singer, "nus48e": nus48e, "opencpop": opencpop,
    "opensinger": opensinger, "opera": opera, "pjs": pjs, "popbutfy": popbutfy, "popcs": popcs,
    "ljspeech": ljspeech, "vctk": vctk, "libritts": libritts,
}

# The other folder level a user may point at: the download root above, or the folder below.
OTHER_LEVEL: dict[str, Callable[[Path], Path]] = {
    "kising": lambda root: root.parent, "opera": lambda root: root.parent,
    "popbutfy": lambda root: root.parent, "popcs": lambda root: root.parent,
    "pjs": lambda root: root / "PJS_corpus_ver1.1", "ljspeech": lambda root: root.parent,
    "libritts": lambda root: root.parent, "vctk": lambda root: root.parent,
}

# name -> (train count, exact test Uids, speaker labels)
EXPECTED: dict[str, tuple[int, set[str], set[str]]] = {
    "csd": (4, {"en_004a_0000", "en_004a_0001", "kr_013a_0000", "kr_013a_0001"}, {"Female1"}),
    "kising": (2, {"421_0001", "421_0040", "424_0013", "431_0026"}, {"female1"}),
    "m4singer": (2, {"Alto-1_美错_0000", "Alto-1_美错_0001", "Bass-1_十年_0000", "Soprano-2_同桌的你_0000",
                     "Tenor-5_爱笑的眼睛_0003"},
                 {"Alto-1", "Alto-2", "Bass-1", "Soprano-2", "Tenor-1", "Tenor-5"}),
    "nus48e": (2, {"ADIZ_read#01#0000", "ADIZ_read#01#0001", "JLEE_read#08#0000", "MCUR_sing#10#0000",
                   "SAMF_sing#18#0000"}, {"ADIZ", "JLEE", "MCUR", "SAMF"}),
    "opencpop": (2, {"2002000001"}, {"female1"}),
    "opensinger": (2, {"Man_0_大鱼_0", "Man_0_大鱼_1", "Man_21_丑八怪_0", "Woman_39_mojito_0", "Woman_40_易燃易爆炸_0"},
                   {"Man_0", "Man_21", "Man_3", "Woman_39", "Woman_40", "Woman_0"}),
    "opera": (2, {"fem_01#neg_1#0000", "fem_01#neg_1#0001", "male_02#neg_1#0000", "fem_12#pos_3#0000",
                  "male_11#pos_2#0000"}, {"fem_01", "male_02", "fem_12", "male_11", "male_13"}),
    "pjs": (6, {f"pjs00{s}_song_{k}" for s in (1, 2, 3) for k in range(3)}, {"male1"}),
    "popbutfy": (2, {"Female1#you_are_my_sunshine_Professional#0", "Female1#you_are_my_sunshine_Professional#1",
                     "Male2#Lemon_Tree_Professional#0", "Male2#Lemon_Tree_Professional#1",
                     "Male5#can_you_feel_the_love_tonight_Professional#0"}, {"Female1", "Female4", "Male2", "Male5"}),
    "popcs": (2, {"明天会更好_0000", "明天会更好_0001", "欧若拉_0000"}, {"female1"}),
    "ljspeech": (20, {"LJ001-0021"}, {"female1"}),
    "vctk": (4, {f"{s}#{u}" for s in ("female_p225", "female_s5", "male_p376", "p999")
                 for u in ("001_mic1", "001_mic2", "002_mic1")}, {"female_p225", "female_s5", "male_p376", "p999"}),
    "libritts": (2, {"test-clean#1089#134686#1089_134686_000001_000000"}, {"103", "1089"}),
}
