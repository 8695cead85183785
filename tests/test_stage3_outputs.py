"""Stage 3's output folder holds only this run's outputs, and every input it could not vocode is listed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from models.vocoders.diffusion.inference_modes import InputError, check_mel, clear_stale_outputs, run_inference
from processors.feature_store import feature_paths
from tests.reliability_kit import HOP, N_MEL, RATE, make_experiment, voice, write_config
from utils.io import save_npy


@pytest.fixture(scope="module")
def vocoder(tmp_path_factory):
    from models.vocoders.diffusion.diffusion_vocoder_inference import vocoder_from_experiment

    root = tmp_path_factory.mktemp("expt")
    return vocoder_from_experiment(make_experiment(root, write_config(root)))


def wavs(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("*.wav"))


def test_a_rerun_moves_aside_the_outputs_of_inputs_it_skips_and_rewrites_skipped_txt(tmp_path, vocoder):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for seed, name in enumerate(("a", "b")):
        sf.write(folder / f"{name}.wav", voice(0.05, seed=seed), RATE)
    run_inference(vocoder, "infer_from_audio", out, audio_dir=str(folder))
    assert wavs(out / "pred") == wavs(out / "gt") == ["a.wav", "b.wav"] and not (out / "skipped.txt").exists()
    (folder / "b.wav").write_text("garbage")
    assert run_inference(vocoder, "infer_from_audio", out, audio_dir=str(folder)) == 1
    assert wavs(out / "pred") == wavs(out / "gt") == ["a.wav"]  # stage 4 must not score the old b
    (aside,) = (out / "earlier").iterdir()
    assert wavs(aside / "pred") == wavs(aside / "gt") == ["b.wav"]  # nor lose it
    assert "b.wav" in (out / "skipped.txt").read_text()
    (folder / "b.wav").unlink()
    run_inference(vocoder, "infer_from_audio", out, audio_dir=str(folder))
    assert not (out / "skipped.txt").exists()


def test_clearing_keeps_the_wavs_this_run_will_rewrite(tmp_path):
    """A rerun after a kill keeps every finished output of a still-valid input in place; gt goes aside where no
    truth comes."""
    for sub, name in (("pred", "keep"), ("gt", "keep"), ("pred", "gone"), ("gt", "mel_only")):
        (tmp_path / sub).mkdir(exist_ok=True)
        sf.write(tmp_path / sub / f"{name}.wav", np.zeros(HOP, np.float32), RATE)
    mel = torch.zeros(1, 1)
    items = [("keep", mel, np.zeros(HOP)), ("mel_only", mel, None)]
    assert clear_stale_outputs(tmp_path, items) == 2
    assert wavs(tmp_path / "pred") == ["keep.wav"] and wavs(tmp_path / "gt") == ["keep.wav"]
    (aside,) = (tmp_path / "earlier").iterdir()
    assert wavs(aside / "pred") == ["gone.wav"] and wavs(aside / "gt") == ["mel_only.wav"]


def test_outputs_moved_aside_by_later_runs_never_overwrite_each_other(tmp_path):
    """Runs of inputs {x}, {y}, {another x}, {z} into one folder: both x outputs survive in earlier/."""
    mel = torch.zeros(1, 1)
    for k, (name, after) in enumerate((("x", "y"), ("x", "z"))):
        (tmp_path / "pred").mkdir(exist_ok=True)
        sf.write(tmp_path / "pred" / f"{name}.wav", np.full(HOP, 0.1 * (k + 1), np.float32), RATE)
        assert clear_stale_outputs(tmp_path, [(after, mel, None)]) == 1
    kept = sorted(sf.read(wav)[0][0] for wav in (tmp_path / "earlier").glob("*/pred/x.wav"))
    assert np.allclose(kept, [0.1, 0.2], atol=1e-3)


BAD_TRUTH = {  # ground-truth audio .npy that stage 1 never writes, and the reason each is listed
    "scalar": (np.float32(0.1), "must be 1-D"), "nan": (np.full(8 * HOP, np.nan, np.float32), "NaN or inf"),
    "stereo": (np.zeros((8 * HOP, 2), np.float32), "must be 1-D"), "short": (np.zeros(100, np.float32), "100 samples"),
    "pcm": (np.zeros(8 * HOP, np.int16), "float array"),
}


def test_dataset_mode_lists_ground_truth_it_cannot_score_and_vocodes_the_rest(tmp_path, vocoder):
    vocoder.cfg.preprocess.processed_dir = str(tmp_path / "data")
    truths = {"good": np.zeros(8 * HOP + 5, np.float32), **{k: v for k, (v, _) in BAD_TRUTH.items()}}
    entries = [{"Dataset": "demo", "Uid": uid, "Path": "-", "Duration": 0.1, "Singer": "s", "index": i}
               for i, uid in enumerate([*truths, "unmade"])]  # unmade: listed, but stage 1 made no features
    (tmp_path / "data/demo/audios").mkdir(parents=True)
    (tmp_path / "data/demo/test.json").write_text(json.dumps(entries), encoding="utf-8")
    for entry in entries[:-1]:
        mel_path, audio_path = feature_paths(tmp_path / "data", entry)
        save_npy(mel_path, np.full((N_MEL, 8), -5.0, np.float32))
        np.save(audio_path, truths[entry["Uid"]])  # np.save: save_npy would make the scalar 1-D
    out = tmp_path / "out"
    assert run_inference(vocoder, "infer_from_dataset", out, ["demo"]) == 1
    assert wavs(out / "pred") == wavs(out / "gt") == ["good.wav"] and len(sf.read(out / "gt/good.wav")[0]) == 8 * HOP
    lines = (out / "skipped.txt").read_text().splitlines()
    for uid, (_, reason) in BAD_TRUTH.items():
        assert any(line.startswith(f"{tmp_path}/data/demo/audios/{uid}.npy: ") and reason in line for line in lines)
    assert f"{tmp_path}/data/demo/mels/unmade.npy: no features for demo utterance unmade (skipped in stage 1?)" in lines


def test_complex_mels_are_refused_not_cut_to_their_real_part():
    with pytest.raises(InputError, match=r"^x\.npy: mel must be a real \(float or integer\) array, got dtype complex64"):
        check_mel(np.full((N_MEL, 4), -5 + 1j, np.complex64), N_MEL, "x.npy")
    assert check_mel(np.full((N_MEL, 4), -5, np.int16), N_MEL, "x.npy").dtype == torch.float32


def test_float64_values_beyond_float32_are_refused_after_the_cast_not_vocoded_as_inf(recwarn):
    mel = np.full((N_MEL, 6), -5.0)
    mel[:, 2] = 1e300  # finite in float64, inf in float32
    with pytest.raises(InputError, match=r"^x\.npy: mel values overflow float32 \(largest magnitude 1e\+300\)$"):
        check_mel(mel, N_MEL, "x.npy")
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # no raw numpy overflow warning
    with pytest.raises(InputError, match=r"^x\.npy: mel has zero frames \(shape \(0, 40\)\)$"):
        check_mel(np.zeros((0, N_MEL), np.float32), N_MEL, "x.npy")  # not first "transposed", then refused


def test_a_square_feature_mel_is_vocoded_with_a_warning_that_its_orientation_was_assumed(tmp_path, vocoder, caplog):
    np.save(tmp_path / "square.npy", np.full((N_MEL, N_MEL), -5.0, np.float32))
    np.save(tmp_path / "wide.npy", np.full((N_MEL, N_MEL + 1), -5.0, np.float32))
    with caplog.at_level("WARNING"):
        assert run_inference(vocoder, "infer_from_feature", tmp_path / "out", feature_dir=str(tmp_path)) == 2
    warned = [r.getMessage() for r in caplog.records if "orientation" in r.getMessage()]
    assert warned == [f"{tmp_path / 'square.npy'}: square mel ({N_MEL}, {N_MEL}): its orientation is ambiguous; "
                      "assumed (n_mel, frames)"]
    assert len(sf.read(tmp_path / "out" / "pred" / "square.wav")[0]) == N_MEL * HOP


def test_comma_separated_datasets_are_explained_with_the_experiments_datasets(tmp_path, vocoder):
    with pytest.raises(InputError, match=r"demo,vctk/test\.json: metadata missing; run stage 1 for dataset 'demo,vctk' "
                                         r"first; --infer_datasets takes space-separated names \(the experiment was "
                                         r"trained on demo\)$"):
        run_inference(vocoder, "infer_from_dataset", tmp_path / "out", datasets=["demo,vctk"])


def test_one_audio_file_is_vocoded_and_downmixed_inputs_are_counted_in_one_line(tmp_path, vocoder, caplog):
    mono, folder = voice(0.05), tmp_path / "in"
    folder.mkdir()
    sf.write(folder / "stereo.wav", np.stack([mono, 0.5 * mono], axis=1), RATE)
    sf.write(folder / "six.wav", np.tile(mono[:, None], (1, 6)), RATE)
    sf.write(folder / "mono.wav", mono, RATE)
    with caplog.at_level("INFO"):
        assert run_inference(vocoder, "infer_from_audio", tmp_path / "one", audio_dir=str(folder / "stereo.wav")) == 1
        assert run_inference(vocoder, "infer_from_audio", tmp_path / "all", audio_dir=str(folder)) == 3
    assert wavs(tmp_path / "one" / "pred") == wavs(tmp_path / "one" / "gt") == ["stereo.wav"]
    lines = [r.getMessage() for r in caplog.records if "downmixed" in r.getMessage()]
    assert lines == [f"1 input downmixed to mono (channels averaged): {folder / 'stereo.wav'} (2 channels)",
                     f"2 inputs downmixed to mono (channels averaged): {folder / 'six.wav'} (6 channels), "
                     f"{folder / 'stereo.wav'} (2 channels)"]


def test_feature_files_of_other_formats_are_listed_and_upper_case_npy_is_vocoded(tmp_path, vocoder):
    folder = tmp_path / "mels"
    folder.mkdir()
    with open(folder / "shout.NPY", "wb") as handle:  # np.save would add .npy to the name
        np.save(handle, np.full((N_MEL, 4), -5.0, np.float32))
    np.savez(folder / "pair.npz", mel=np.zeros((N_MEL, 4), np.float32))
    (folder / "notes").write_text("x")
    (folder / ".DS_Store").write_bytes(b"\0\0")
    assert run_inference(vocoder, "infer_from_feature", tmp_path / "out", feature_dir=str(folder)) == 1
    assert wavs(tmp_path / "out" / "pred") == ["shout.wav"]
    assert (tmp_path / "out" / "skipped.txt").read_text().splitlines() == [
        f"{folder}/notes: not a .npy mel (no extension): unsupported format",
        f"{folder}/pair.npz: not a .npy mel (.npz): unsupported format"]


def test_an_output_folder_inside_the_audio_folder_is_not_read_back(tmp_path, vocoder):
    """Vocoding a folder into a subfolder of itself took the last run's wavs as inputs: more at every run."""
    folder = tmp_path / "in"
    folder.mkdir()
    sf.write(folder / "a.wav", voice(0.05), RATE)
    for _ in range(2):
        assert run_inference(vocoder, "infer_from_audio", folder / "vocoded", audio_dir=str(folder)) == 1
    assert wavs(folder / "vocoded" / "pred") == ["a.wav"]


def test_a_ground_truth_folder_that_cannot_be_written_is_refused_before_vocoding(tmp_path, vocoder, monkeypatch):
    (tmp_path / "in").mkdir()
    sf.write(tmp_path / "in" / "a.wav", voice(0.05), RATE)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "gt").write_text("a file, not a folder")
    monkeypatch.setattr(type(vocoder), "__call__", lambda *a, **k: pytest.fail("vocoded before checking the folder"))
    with pytest.raises(InputError, match=r"out/gt: cannot write the outputs there"):
        run_inference(vocoder, "infer_from_audio", tmp_path / "out", audio_dir=str(tmp_path / "in"))


def test_an_output_folder_that_cannot_be_written_is_refused_before_vocoding(tmp_path, vocoder, monkeypatch):
    (tmp_path / "mels").mkdir()
    np.save(tmp_path / "mels" / "a.npy", np.full((N_MEL, 4), -5.0, np.float32))
    (tmp_path / "out").write_text("a file, not a folder")
    monkeypatch.setattr(type(vocoder), "__call__", lambda *a, **k: pytest.fail("vocoded before checking the folder"))
    with pytest.raises(InputError, match=r"out/pred: cannot write the outputs there"):
        run_inference(vocoder, "infer_from_feature", tmp_path / "out", feature_dir=str(tmp_path / "mels"))


def test_the_summary_line_names_the_sampler_as_chosen(tmp_path, vocoder, caplog):
    """Not "ddpm", which the fast, full and searched samplers all said."""
    from models.vocoders.diffusion.diffusion_vocoder_inference import Vocoder

    fast = Vocoder(vocoder.cfg, vocoder.model, sampler="fast")
    np.save(tmp_path / "a.npy", np.full((N_MEL, 4), -5.0, np.float32))
    with caplog.at_level("INFO"):
        assert run_inference(fast, "infer_from_feature", tmp_path / "out", feature_dir=str(tmp_path)) == 1
    assert caplog.records[-1].getMessage().endswith("with the fast sampler (6 steps)")
