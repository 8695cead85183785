"""Stage 3's output folder holds only this run's outputs, and every input it could not vocode is listed."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from models.vocoders.diffusion.inference_modes import clear_stale_outputs, run_inference
from tests.reliability_kit import HOP, RATE, make_experiment, voice, write_config


@pytest.fixture(scope="module")
def vocoder(tmp_path_factory):
    from models.vocoders.diffusion.diffusion_vocoder_inference import vocoder_from_experiment

    root = tmp_path_factory.mktemp("expt")
    return vocoder_from_experiment(make_experiment(root, write_config(root)))


def wavs(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("*.wav"))


def test_a_rerun_removes_the_outputs_of_inputs_it_skips_and_rewrites_skipped_txt(tmp_path, vocoder):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for seed, name in enumerate(("a", "b")):
        sf.write(folder / f"{name}.wav", voice(0.05, seed=seed), RATE)
    run_inference(vocoder, "infer_from_audio", out, audio_dir=str(folder))
    assert wavs(out / "pred") == wavs(out / "gt") == ["a.wav", "b.wav"] and not (out / "skipped.txt").exists()
    (folder / "b.wav").write_text("garbage")
    assert run_inference(vocoder, "infer_from_audio", out, audio_dir=str(folder)) == 1
    assert wavs(out / "pred") == wavs(out / "gt") == ["a.wav"]  # stage 4 must not score the old b
    assert "b.wav" in (out / "skipped.txt").read_text()
    (folder / "b.wav").unlink()
    run_inference(vocoder, "infer_from_audio", out, audio_dir=str(folder))
    assert not (out / "skipped.txt").exists()


def test_clearing_keeps_the_wavs_this_run_will_rewrite(tmp_path):
    """A rerun after a kill keeps every finished output of a still-valid input; gt goes where no truth comes."""
    for sub, name in (("pred", "keep"), ("gt", "keep"), ("pred", "gone"), ("gt", "mel_only")):
        (tmp_path / sub).mkdir(exist_ok=True)
        sf.write(tmp_path / sub / f"{name}.wav", np.zeros(HOP, np.float32), RATE)
    mel = torch.zeros(1, 1)
    items = [("keep", mel, np.zeros(HOP)), ("mel_only", mel, None)]
    assert clear_stale_outputs(tmp_path, items) == 2
    assert wavs(tmp_path / "pred") == ["keep.wav"] and wavs(tmp_path / "gt") == ["keep.wav"]
