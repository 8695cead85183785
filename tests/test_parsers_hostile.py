"""Corpus parsers against a hostile tester's corpora: changed sources, odd names, links, bad label files."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from processors.datasets import DatasetError, collecting_left_out, get_parser
from tests.corpora import (
    BUILDERS,
    EXPECTED,
    csd,
    libritts,
    ljspeech,
    m4singer,
    nus48e,
    opencpop,
    pjs,
    quiet,
    tone,
    write_audio,
    write_text,
)


def parse(name: str, root: Path, work: Path) -> tuple[dict[str, dict], list[str]]:
    """Entries by Uid and the left-out lines of one parse."""
    with collecting_left_out() as left:
        train, test = get_parser(name)(root, name, work)
    return {e["Uid"]: e for e in train + test}, left


def test_a_rewritten_source_is_cut_again(tmp_path):
    root = pjs(tmp_path / "pjs")
    before, _left = parse("pjs", root, tmp_path / "work")
    song = root / "PJS_corpus_ver1.1" / "pjs004" / "pjs004_song.wav"
    stamp = song.stat().st_mtime_ns
    sr = 48000
    write_audio(song, np.concatenate([quiet(0.3, sr), tone(3.0, sr, freq=440), quiet(0.3, sr)]), sr)
    os.utime(song, ns=(stamp + 10**9, stamp + 10**9))
    after, _left = parse("pjs", root, tmp_path / "work")
    assert after["pjs004_song_0"]["Duration"] > before["pjs004_song_0"]["Duration"]
    assert after["pjs010_song_0"] == before["pjs010_song_0"]


def test_another_copy_of_the_corpus_is_cut_from_the_copy_and_unlisted_clips_removed(tmp_path):
    one = nus48e(tmp_path / "one")
    two = tmp_path / "two"
    shutil.copytree(one, two)
    source = two / "ADIZ" / "read" / "01.wav"  # same size and mtime, but one clip, not two
    info = source.stat()
    sf.write(source, np.concatenate([tone(8.5, 44100, freq=330)]), 44100)
    os.utime(source, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert source.stat().st_size == info.st_size
    work = tmp_path / "work"
    first, _left = parse("nus48e", one, work)
    second, _left = parse("nus48e", two, work)
    assert "ADIZ_read#01#0001" in first and "ADIZ_read#01#0001" not in second
    assert not (work / "clips" / "ADIZ" / "read" / "01" / "0001.wav").exists()
    clip, _sr = sf.read(second["ADIZ_read#01#0000"]["Path"])
    assert len(clip) == 8.5 * 44100


def test_a_fixed_lyric_file_gives_the_song_its_clips(tmp_path):
    root = csd(tmp_path / "csd")
    txt = root / "english" / "txt" / "en001a.txt"
    good = txt.read_text(encoding="utf-8")
    txt.write_text("wrong syllables here\n", encoding="utf-8")
    broken, left = parse("csd", root, tmp_path / "work")
    assert not any(uid.startswith("en_001a") for uid in broken)
    assert any("en001a.txt: line 1: syllables do not match" in line for line in left)
    assert any("en001a.wav: no clips cut" in line for line in left)
    txt.write_text(good, encoding="utf-8")
    fixed, left = parse("csd", root, tmp_path / "work")
    assert {"en_001a_0000", "en_001a_0001"} <= set(fixed) and not any("en001a" in line for line in left)


def test_upper_case_names_are_read_and_dangling_links_listed(tmp_path):
    root = ljspeech(tmp_path / "lj")
    wavs = root / "wavs"
    (wavs / "LJ001-0003.wav").rename(wavs / "LJ001-0003.WAV")
    (wavs / "LJ009-0001.wav").symlink_to(tmp_path / "nowhere.wav")
    entries, left = parse("ljspeech", root, tmp_path / "work")
    assert "LJ001-0003" in entries and "LJ009-0001" not in entries
    assert left == [f"{wavs / 'LJ009-0001.wav'}: not a readable file (a dangling link)"]


def test_opencpop_finds_a_listed_id_whose_wav_is_upper_case(tmp_path):
    root = opencpop(tmp_path / "cpop")
    wavs = root / "segments" / "wavs"
    (wavs / "2001000002.wav").rename(wavs / "2001000002.WAV")
    entries, left = parse("opencpop", root, tmp_path / "work")
    assert "2001000002" in entries and not any("2001000002" in line for line in left)


def test_a_song_with_unreadable_labels_is_left_out_and_the_rest_parsed(tmp_path):
    root = csd(tmp_path / "csd")
    write_text(root / "english" / "csv" / "en001a.csv", "start,end,pitch,syllable\nsoon,0.3,60,twin\n")
    (root / "korean" / "txt" / "kr013a.txt").write_bytes("나 비 야".encode("utf-16"))
    entries, left = parse("csd", root, tmp_path / "work")
    assert not any(uid.startswith(("en_001a", "kr_013a")) for uid in entries) and "en_004a_0000" in entries
    assert any("en001a.csv: not a start,end,syllable note table" in line for line in left)
    assert any("kr013a.txt: not UTF-8 text" in line for line in left)


def test_a_transcript_that_is_not_utf8_keeps_its_utterance(tmp_path):
    root = libritts(tmp_path / "libri")
    stem = "103_1241_000000_000002"
    (root / "train-clean-100" / "103" / "1241" / f"{stem}.normalized.txt").write_bytes("caf\xe9".encode("latin-1"))
    entries, _left = parse("libritts", root, tmp_path / "work")
    assert entries[f"train-clean-100#103#1241#{stem}"]["Text"] == "caf\ufffd"


def test_m4singer_entries_without_item_name_are_listed_and_a_wrong_meta_is_one_line(tmp_path):
    root = m4singer(tmp_path / "m4")
    meta = root / "meta.json"
    items = json.loads(meta.read_text(encoding="utf-8"))
    meta.write_text(json.dumps([*items, {"txt": "no name"}, "junk"], ensure_ascii=False), encoding="utf-8")
    entries, left = parse("m4singer", root, tmp_path / "work")
    assert "Alto-1_美错_0000" in entries
    assert [line for line in left if "item_name string" in line] == [
        f"{meta}: entry {len(items)} has no item_name string; left out",
        f"{meta}: entry {len(items) + 1} has no item_name string; left out"]
    for text, message in (('{"Alto-1#美错#0000": {}}', "expected a list of items with an item_name, found a dict"),
                          ('[{"item_name": "Alto-1#美错#0000"},', "not valid JSON")):
        meta.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=f"^{re.escape(str(meta))}: {message}") as err:
            parse("m4singer", root, tmp_path / "work")
        assert "\n" not in str(err.value)


def test_list_files_with_a_byte_order_mark_keep_their_first_id(tmp_path):
    root = opencpop(tmp_path / "cpop")
    for name in ("train.txt", "test.txt"):
        listing = root / "segments" / name
        listing.write_bytes(b"\xef\xbb\xbf" + listing.read_bytes().replace(b"\n", b"\r\n"))
    entries, _left = parse("opencpop", root, tmp_path / "work")
    assert {"2001000001", "2001000002", "2002000001"} == set(entries)


def test_list_files_whose_lyrics_are_not_utf8_keep_their_ids(tmp_path):
    """A test.txt re-saved in GBK stopped stage 1 with "'utf-8' codec can't decode byte ...", naming no file."""
    root = opencpop(tmp_path / "cpop")
    (root / "segments" / "test.txt").write_bytes("2002000001|你好|n i h ao|C4|0.1\n".encode("gbk"))
    entries, _left = parse("opencpop", root, tmp_path / "work")
    assert {"2001000001", "2001000002", "2002000001"} == set(entries)


def test_an_empty_recording_to_cut_is_listed_as_empty(tmp_path):
    root = pjs(tmp_path / "pjs")
    song = root / "PJS_corpus_ver1.1" / "pjs004" / "pjs004_song.wav"
    song.write_bytes(b"")
    entries, left = parse("pjs", root, tmp_path / "work")
    assert "pjs004_song_0" not in entries and left == [f"{song}: not cut into clips ({song}: empty file)"]


def test_a_manifest_naming_files_outside_its_folder_deletes_nothing(tmp_path):
    root, work = pjs(tmp_path / "pjs"), tmp_path / "work"
    parse("pjs", root, work)
    victim = tmp_path / "victim.txt"
    victim.write_text("not a clip")
    (work / "clips" / ".pjs004_song.wav.clips").write_text(json.dumps({"inputs": [], "clips": ["../../victim.txt"]}))
    entries, _left = parse("pjs", root, work)
    assert victim.is_file() and "pjs004_song_0" in entries


@pytest.mark.parametrize("listed", [[""], ["sub"], ["a\u0000b"], ["pjs010_song_0.wav"]])
def test_a_manifest_naming_a_folder_or_another_sources_clip_is_ignored(tmp_path, listed):
    """`""` made stage 1 unlink the clips folder (`Is a directory`) on every run; another song's clip was deleted."""
    root, work = pjs(tmp_path / "pjs"), tmp_path / "work"
    parse("pjs", root, work)
    other = work / "clips" / "pjs010_song_0.wav"
    stamp = other.stat().st_mtime_ns, other.stat().st_ino
    (work / "clips" / "sub").mkdir()
    (work / "clips" / ".pjs004_song.wav.clips").write_text(json.dumps({"inputs": [], "clips": listed}))
    entries, left = parse("pjs", root, work)
    assert (other.stat().st_mtime_ns, other.stat().st_ino) == stamp and (work / "clips" / "sub").is_dir()
    assert "pjs004_song_0" in entries and left == []


def test_a_recording_name_near_the_file_name_limit_gets_short_clip_names(tmp_path):
    root = pjs(tmp_path / "pjs")
    song = root / "PJS_corpus_ver1.1" / "pjs004" / "pjs004_song.wav"
    song.rename(song.with_name("pjs004" + "x" * 240 + "_song.wav"))
    entries, left = parse("pjs", root, tmp_path / "work")
    assert left == [] and len(entries) == 15 and all(len(e["Uid"].encode()) <= 190 for e in entries.values())
    assert parse("pjs", root, tmp_path / "work")[0] == entries


def test_a_clip_that_cannot_be_written_leaves_its_recording_out(tmp_path, monkeypatch):
    from processors.datasets import clips

    def full_for_pjs004(path: Path, data: bytes) -> None:
        if "pjs004" in path.name:
            raise OSError(28, "No space left on device", str(path))
        write(path, data)

    write = clips.atomic_write_bytes
    monkeypatch.setattr(clips, "atomic_write_bytes", full_for_pjs004)
    root = pjs(tmp_path / "pjs")
    entries, left = parse("pjs", root, tmp_path / "work")
    song = root / "PJS_corpus_ver1.1" / "pjs004" / "pjs004_song.wav"
    assert "pjs004_song_0" not in entries and "pjs010_song_0" in entries
    assert left == [f"{song}: not cut into clips ([Errno 28] No space left on device: '{tmp_path}/work/clips/pjs004_song_0.wav')"]


def test_pjs_reads_a_song_folder_that_is_a_symlink(tmp_path):
    """Path.rglob does not follow symlinked folders (Python 3.11); the corpus fingerprint does."""
    root = pjs(tmp_path / "pjs")
    folder = root / "PJS_corpus_ver1.1" / "pjs004"
    folder.rename(tmp_path / "elsewhere")
    folder.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    entries, left = parse("pjs", root, tmp_path / "work")
    assert "pjs004_song_0" in entries and len(entries) == 15 and left == []


APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4000)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_macos_companion_files_are_not_utterances(tmp_path, name):
    """A copy made on a Mac leaves `._<name>` beside every file; they sort first, so they took VCTK's test places,
    shifted LJSpeech's last 5% and gave PopCS two clips named '<song>_.'."""
    root = BUILDERS[name](tmp_path / name)
    clean, _left = parse(name, root, tmp_path / "clean")
    for path in [p for p in (tmp_path / name).rglob("*") if p.is_file()]:
        (path.parent / f"._{path.name}").write_bytes(APPLE_DOUBLE)
    with collecting_left_out() as left:
        train, test = get_parser(name)(root, name, tmp_path / "work")
    assert {e["Uid"] for e in train + test} == set(clean) and {e["Uid"] for e in test} == EXPECTED[name][1]
    assert not any("._" in line for line in left)


@pytest.mark.parametrize(("name", "stray"), [
    ("opencpop", "segments/wavs/2003000001.wav"), ("m4singer", "Tenor-3#新歌/0000.wav"),
    ("opensinger", "ManRaw/0_大鱼/0_大鱼.wav"), ("popbutfy", "Female4#singing#Someone_Like_You_Amateur/take2.wav"),
    ("popcs", "popcs-欧若拉/0001.wav"), ("kising", "421/0041.flac"),
])
def test_audio_a_parser_passes_over_is_listed_not_dropped(tmp_path, name, stray):
    """A wav in no official list, or named otherwise than the layout, was passed over without a word."""
    root = BUILDERS[name](tmp_path / name)
    write_audio(root / stray, 0.3, 24000)
    entries, left = parse(name, root, tmp_path / "work")
    assert len(entries) == EXPECTED[name][0] + len(EXPECTED[name][1])
    named = [line for line in left if line.startswith(f"{root / stray}: ")]
    assert len(named) == 1 and named[0].endswith("; not used")


def test_pjs_test_songs_are_found_in_any_case_as_the_songs_are(tmp_path):
    root = pjs(tmp_path / "pjs")
    song = root / "PJS_corpus_ver1.1" / "pjs001"
    (song / "pjs001_song.wav").rename(song / "PJS001_Song.WAV")
    _train, test = get_parser("pjs")(root, "pjs", tmp_path / "work")
    assert {e["Uid"] for e in test} >= {"PJS001_Song_0", "PJS001_Song_1", "PJS001_Song_2"} and len(test) == 9


@pytest.mark.parametrize(("name", "copy", "used"), [
    ("vctk", "wav48_silence_trimmed/p225/p225_001_mic1.wav", "p225_001_mic1.flac"),
    ("opera", "western/fem_12/pos_3.mp3", "pos_3.wav"),
])
def test_a_converted_copy_beside_a_recording_is_listed_not_a_second_utterance(tmp_path, name, copy, used):
    """Two formats of one recording gave two utterances one Uid, which stopped the whole corpus."""
    root = BUILDERS[name](tmp_path / name)
    write_audio(root / copy, 0.5, 24000)
    entries, left = parse(name, root, tmp_path / "work")
    assert len(entries) == EXPECTED[name][0] + len(EXPECTED[name][1])
    assert left == [f"{root / copy}: another copy of {used}, which is used"]


def test_a_uid_clash_names_the_files(tmp_path):
    root = BUILDERS["kising"](tmp_path / "kising")
    write_audio(root / "422" / "0001.WAV", 0.3, 24000)
    with pytest.raises(DatasetError, match=f"'422_0001': {root}/422/0001.WAV and {root}/422/0001.wav"):
        parse("kising", root, tmp_path / "work")


def test_csd_names_the_label_file_that_is_missing(tmp_path):
    root = csd(tmp_path / "csd")
    (root / "english" / "csv" / "en001a.csv").unlink()
    _entries, left = parse("csd", root, tmp_path / "work")
    assert left == [f"{root / 'english/wav/en001a.wav'}: csv/en001a.csv missing; not cut into clips"]
