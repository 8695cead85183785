"""Corpus parsers and stage 1 on fixture corpora laid out like the real downloads (tests/corpora.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from processors.datasets import CORPORA, DatasetError, get_parser, parser_name
from processors.datasets.slicer import slice_spans, trim_span
from processors.datasets.vctk import genders
from processors.preprocess import preprocess
from tests.corpora import BUILDERS, EXPECTED, OTHER_LEVEL, nus48e, tone
from utils.config import to_attrdict
from utils.io import load_json

HOP, N_MEL = 128, 20


def config(processed: Path, paths: dict[str, Path]):
    return to_attrdict({
        "dataset": list(paths), "dataset_path": {k: str(v) for k, v in paths.items()}, "use_custom_dataset": [],
        "preprocess": {"processed_dir": str(processed), "train_file": "train.json", "valid_file": "test.json",
                       "spk2id": "singers.json", "utt2spk": "utt2spk", "sample_rate": 16000, "n_fft": 512,
                       "win_size": 512, "hop_size": HOP, "n_mel": N_MEL, "fmin": 0, "fmax": 8000},
    })


def tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def everything(name: str, roots: dict[str, Path], work: Path) -> list[dict]:
    train, test = get_parser(name)(roots[name], name, work)
    return train + test


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("raw")
    found = {}
    for name, build in BUILDERS.items():
        (base / name).mkdir()
        found[name] = build(base / name)
    return found


@pytest.fixture(scope="module")
def processed(roots, tmp_path_factory) -> Path:
    """All thirteen corpora through stage 1 in one run, as a user's config would list them."""
    out = tmp_path_factory.mktemp("processed")
    preprocess(config(out, roots), num_workers=1)
    return out


def test_every_corpus_has_a_fixture():
    assert set(BUILDERS) == set(EXPECTED) == set(CORPORA)


@pytest.mark.parametrize("name", CORPORA)
def test_parse_finds_the_split_and_speakers_without_touching_the_corpus(name, roots, tmp_path):
    before = tree(roots[name].parent)
    train, test = get_parser(name)(roots[name], name, tmp_path / name)
    n_train, test_uids, speakers = EXPECTED[name]
    uids = [e["Uid"] for e in train + test]
    assert len(uids) == len(set(uids)) == n_train + len(test_uids)
    assert len(train) == n_train
    assert {e["Uid"] for e in test} == test_uids
    assert {e["Singer"] for e in train + test} == speakers
    assert all(e["Dataset"] == name and e["Duration"] > 0 and Path(e["Path"]).is_file() for e in train + test)
    assert tree(roots[name].parent) == before  # nothing written into the raw corpus


@pytest.mark.parametrize("name", sorted(OTHER_LEVEL))
def test_both_root_levels_are_accepted(name, roots, tmp_path):
    documented = get_parser(name)(roots[name], name, tmp_path / "a")
    other = get_parser(name)(OTHER_LEVEL[name](roots[name]), name, tmp_path / "b")
    assert [[e["Uid"] for e in split] for split in documented] == [[e["Uid"] for e in split] for split in other]


@pytest.mark.parametrize("name", CORPORA)
def test_empty_folder_is_an_error_naming_folder_and_layout(name, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no utterances found; expected") as err:
        get_parser(name)(tmp_path / "empty", name, tmp_path / "work")
    assert str(tmp_path / "empty") in str(err.value)


def test_vctk_080_layout_and_two_corpus_folders_are_refused_by_name(tmp_path):
    old = tmp_path / "VCTK-Corpus"
    (old / "wav48" / "p225").mkdir(parents=True)
    sf.write(old / "wav48" / "p225" / "p225_001.wav", np.zeros(4800, np.float32), 48000)
    for root in (old, tmp_path):  # the corpus folder or its parent
        with pytest.raises(DatasetError, match=rf"^{old}: VCTK 0\.80 layout \(wav48/\) found; this toolkit reads the "
                                               r"0\.92 layout \(wav48_silence_trimmed/\)"):
            get_parser("vctk")(root, "vctk", tmp_path / "work")
    for copy in ("a", "b"):  # a parent holding two corpus folders: which one is meant is not guessed
        (tmp_path / "two" / copy / "wav48_silence_trimmed").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"two: 2 VCTK folders inside \(a, b\); set dataset_path to one of them$"):
        get_parser("vctk")(tmp_path / "two", "vctk", tmp_path / "work")


def test_vctk_at_a_mount_root_skips_a_sibling_it_may_not_read(tmp_path, monkeypatch):
    """dataset_path at a mount root: lost+found is root's alone, and looking inside it fails with EACCES."""
    from processors.datasets.vctk import corpus_root

    (tmp_path / "VCTK-Corpus-0.92" / "wav48_silence_trimmed").mkdir(parents=True)
    (tmp_path / "lost+found").mkdir()
    real = Path.is_dir

    def guarded(path: Path) -> bool:
        if "lost+found" in path.parts and path.name != "lost+found":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(Path, "is_dir", guarded)
    assert corpus_root(tmp_path) == tmp_path / "VCTK-Corpus-0.92"


def test_unknown_dataset_lists_known_names():
    with pytest.raises(DatasetError) as err:
        get_parser("nosuch")
    assert "nosuch" in str(err.value) and all(name in str(err.value) for name in CORPORA)


def test_opencpop_alias_keeps_configured_name(roots, tmp_path):
    assert parser_name("opencpop_beta") == "opencpop"
    train, test = get_parser("opencpop_beta")(roots["opencpop"], "opencpop_beta", tmp_path)
    assert {e["Dataset"] for e in train + test} == {"opencpop_beta"}


def test_fields_that_the_original_gets_wrong(roots, tmp_path):
    m4 = {e["Uid"]: e for e in everything("m4singer", roots, tmp_path)}
    assert m4["Tenor-1_Let It Go_0000"]["Song"] == "Let It Go" and m4["Alto-2_a_b-c d_0002"]["Song"] == "a_b-c d"
    os_ = {e["Uid"]: e for e in everything("opensinger", roots, tmp_path)}
    assert os_["Man_3_see_you_again_0"]["Song"] == "see_you_again"
    assert {e["Song"] for e in everything("popcs", roots, tmp_path)} == {
        "明天会更好", "欧若拉", "Let-It-Go", "小 幸运"}
    libri = everything("libritts", roots, tmp_path)
    assert libri[0]["Text"] == "Text of 103_1241_000000_000001." and not any("dev-" in e["Uid"] for e in libri)


def test_opensinger_drops_long_clips_with_a_message(roots, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        entries = everything("opensinger", roots, tmp_path)
    assert all(e["Duration"] <= 30 for e in entries) and "41_long song_0.wav" in caplog.text


def test_csd_clamps_a_negative_start(roots, tmp_path):
    entries = {e["Uid"]: e for e in everything("csd", roots, tmp_path)}
    assert entries["en_001a_0000"]["Duration"] == pytest.approx(1.35, abs=1e-3)  # 0.05 s - 0.1 s -> 0
    assert entries["en_001a_0001"]["Duration"] == pytest.approx(2.25 - 1.15, abs=1e-3)


def test_pjs_trims_then_cuts_in_three_with_one_second_overlap(roots, tmp_path):
    clips = {e["Uid"]: e["Duration"] for e in everything("pjs", roots, tmp_path)}
    third = (1.5 + 2 * 0.05) / 3  # 1.5 s of sound plus the trim margin, 0.6 s of silence gone
    assert clips["pjs001_song_0"] == pytest.approx(third + 1, abs=0.03)
    assert clips["pjs001_song_2"] == pytest.approx(third, abs=0.03)


def test_cut_is_resumable(tmp_path):
    root = nus48e(tmp_path / "raw")
    parse = get_parser("nus48e")
    parse(root, "nus48e", tmp_path / "work")
    before = tree(tmp_path / "work")
    parse(root, "nus48e", tmp_path / "work")
    assert tree(tmp_path / "work") == before
    victim = tmp_path / "work" / "clips" / "ADIZ" / "read" / "01" / "0001.wav"
    victim.unlink()
    parse(root, "nus48e", tmp_path / "work")
    after = tree(tmp_path / "work")
    assert victim.is_file()
    changed = {k for k in after if k.endswith(".wav") and after[k] != before.get(k)}
    assert changed == {str(victim.relative_to(tmp_path / "work"))}


def test_vctk_speaker_info_is_read_robustly(roots):
    assert genders(roots["vctk"] / "speaker-info.txt") == {"p225": "female", "p280": "female", "p376": "male",
                                                           "s5": "female"}


def test_slicer_cuts_long_pauses_and_keeps_at_most_the_allowed_silence():
    sr = 8000
    audio = np.concatenate([tone(6, sr), np.zeros(10 * sr, np.float32), tone(2, sr), np.zeros(sr, np.float32)])
    spans = slice_spans(audio, sr, threshold_db=-40, max_sil_kept_ms=3000)
    assert len(spans) == 2
    (a0, b0), (a1, b1) = spans
    assert a0 == 0 and 8.9 * sr <= b0 <= 9.1 * sr  # 6 s sound + 3 s kept
    assert 12.9 * sr <= a1 <= 13.1 * sr and b1 == len(audio)  # 3 s kept before the sound, 1 s tail kept
    medium = np.concatenate([tone(6, sr), np.zeros(5 * sr, np.float32), tone(2, sr)])
    (_, end), (start, _) = slice_spans(medium, sr, threshold_db=-40, max_sil_kept_ms=3000)
    assert end == start and 7.9 * sr <= end <= 9.1 * sr  # one cut leaving <= 3 s of the 5 s pause each side
    assert slice_spans(tone(4, sr), sr, -40, 3000) == [(0, 4 * sr)]
    short_pause = np.concatenate([tone(3, sr), np.zeros(sr, np.float32), tone(3, sr)])
    assert len(slice_spans(short_pause, sr, -40, 3000)) == 1  # clip before the pause is under 5 s


def test_trim_span_removes_edges():
    sr = 8000
    start, end = trim_span(np.concatenate([np.zeros(sr, np.float32), tone(1, sr), np.zeros(sr, np.float32)]), sr)
    assert abs(start - 0.95 * sr) <= 0.02 * sr and abs(end - 2.05 * sr) <= 0.02 * sr


@pytest.mark.parametrize("name", CORPORA)
def test_stage1_writes_metadata_and_features(name, processed):
    folder = processed / name
    train, test = load_json(folder / "train.json"), load_json(folder / "test.json")
    n_train, test_uids, speakers = EXPECTED[name]
    assert len(train) == n_train and {e["Uid"] for e in test} == test_uids
    assert set(load_json(folder / "singers.json")) == {f"{name}_{s}" for s in speakers}
    meta = load_json(folder / "meta_info.json")
    assert meta["train"]["size"] == n_train and meta["test"]["size"] == len(test_uids)
    assert len((folder / "utt2spk").read_text(encoding="utf-8").splitlines()) == n_train + len(test_uids)
    # only what the layout itself leaves out (a listed-but-missing file, an over-long clip) is listed
    listed = (folder / "skipped.txt").read_text(encoding="utf-8") if (folder / "skipped.txt").exists() else ""
    assert not any(e["Path"] in listed for e in train + test)
    assert ("over 30 s" in listed) == (name == "opensinger") and ("but missing" in listed) == (name in ("m4singer", "opencpop"))
    for e in train + test:
        audio, mel = np.load(folder / "audios" / f"{e['Uid']}.npy"), np.load(folder / "mels" / f"{e['Uid']}.npy")
        assert audio.ndim == 1 and audio.dtype == np.float32
        assert abs(len(audio) - round(e["Duration"] * 16000)) <= 2
        assert mel.shape == (N_MEL, len(audio) // HOP) and mel.dtype == np.float32


def test_rerun_after_deleting_one_feature_redoes_only_that_file(roots, tmp_path):
    cfg = config(tmp_path, {"kising": roots["kising"]})
    preprocess(cfg, num_workers=2)
    before = tree(tmp_path / "kising")
    victim = tmp_path / "kising" / "mels" / "421_0040.npy"
    victim.unlink()
    preprocess(cfg, num_workers=1)
    after = tree(tmp_path / "kising")
    changed = {k for k in after if k.endswith(".npy") and after[k] != before.get(k)}
    assert victim.is_file()
    assert changed == {os.path.join("mels", "421_0040.npy"), os.path.join("audios", "421_0040.npy")}


def test_custom_folder_uids_do_not_repeat_the_speaker(tmp_path):
    import soundfile as sf

    names = ["spk1/spk1_007.wav", "spk1/008.wav", "spk10/spk1_009.wav", "solo.wav"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(tmp_path / name, tone(0.2, 16000), 16000)
    train, test = get_parser("mine", ["mine"])(tmp_path, "mine", tmp_path)
    entries = train + test
    assert sorted(e["Uid"] for e in entries) == ["solo", "spk10_spk1_009", "spk1_007", "spk1_008"]
    assert {e["Uid"]: e["Singer"] for e in entries}["spk1_007"] == "spk1"
