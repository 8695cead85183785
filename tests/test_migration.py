"""Moving over from the original toolkit: its accelerate checkpoints, its run.sh habits.

The original's checkpoints are made here by accelerate's own `Accelerator.save_state` (tiny
model, CPU) and renamed to its `epoch-XXXX_step-XXXXXXX_loss-X.XXXXXX` pattern, inside its
`<log_dir>/<name>/checkpoint/` layout with the `args.json` it dumps beside.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import save_file

from models.vocoders.diffusion.ddpm import make_plan
from models.vocoders.diffusion.diffusion_vocoder_inference import Vocoder, vocoder_from_experiment
from models.vocoders.diffusion.diffusion_vocoder_trainer import DiffusionVocoderTrainer
from models.vocoders.diffusion.diffwave.diffwave import build_diffwave
from models.vocoders.diffusion.experiment import Experiment, locate_experiment, with_recipe_config
from processors.preprocess import preprocess
from tests.recipe_helpers import REPO, RUN_SH, run_recipe, tiny_training_config
from tests.tiny_experiment import make_experiment, tiny_cfg
from utils.checkpoint import CheckpointError, list_checkpoints, load_weights, read_state, resolve_checkpoint
from utils.config import ConfigError, load_config, save_config
from utils.synthetic import write_corpus

NEWEST, OLDER = "epoch-0003_step-0000120_loss-0.123456", "epoch-0001_step-0000060_loss-0.234567"

class TouchOnLoad:
    """Unpickling this creates a file: proof that nobody unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def original_checkpoint(cfg, folder: Path, seed: int, safe_serialization: bool = True) -> dict[str, torch.Tensor]:
    """What the original trainer leaves after some training: accelerate's save_state under its name."""
    reset_accelerate()
    torch.manual_seed(seed)
    model = build_diffwave(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9)
    acc = Accelerator(cpu=True)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    hop = int(cfg.preprocess.hop_size)
    loss = model(torch.randn(2, 8 * hop), torch.tensor([1, 7]), torch.randn(2, int(cfg.preprocess.n_mel), 8)).abs().mean()
    acc.backward(loss)
    optimizer.step()
    scheduler.step()
    saving = folder.parent / "saving"
    acc.save_state(str(saving), safe_serialization=safe_serialization)
    saving.rename(folder)
    weights = {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}
    reset_accelerate()
    return weights


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory):
    """A preprocessed corpus and an experiment trained by the original: two checkpoints and args.json."""
    root = tmp_path_factory.mktemp("migration")
    write_corpus(root / "corpus", 2, 4, sample_rate=8000)
    cfg = load_config(tiny_training_config(root, "config.json", keep_last=[1]))
    preprocess(cfg, num_workers=1)
    expt = root / "ckpts" / "old_exp"
    (expt / "checkpoint").mkdir(parents=True)
    save_config(cfg, expt / "args.json")
    weights = {OLDER: original_checkpoint(cfg, expt / "checkpoint" / OLDER, 1, safe_serialization=False),
               NEWEST: original_checkpoint(cfg, expt / "checkpoint" / NEWEST, 2)}
    # what else the original leaves in checkpoint/: eval audio named after the checkpoint, and a save cut short
    (expt / "checkpoint" / f"{NEWEST}_eval_audio_demo.wav").write_bytes(b"")
    cut_short = expt / "checkpoint" / "epoch-0009_step-0000900_loss-0.100000"
    cut_short.mkdir()
    save_file(weights[NEWEST], str(cut_short / "model.safetensors"))
    return root, cfg, expt, weights


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_accelerate_folders_are_found_newest_complete_first(original):
    _root, _cfg, expt, _weights = original
    assert [p.name for p in list_checkpoints(expt / "checkpoint")] == [OLDER, NEWEST]  # the cut-short save is skipped
    assert resolve_checkpoint(expt).name == NEWEST and resolve_checkpoint(expt / "checkpoint" / OLDER).name == OLDER
    assert (expt / "checkpoint" / OLDER / "pytorch_model.bin").is_file()
    # the original names a folder after the epoch it finished (from 0) and resumes at the next one
    assert read_state(expt / "checkpoint" / NEWEST) == {"epoch": 4, "step": 120, "batch_in_epoch": 0,
                                                         "skipped_steps": 0, "loss": 0.123456}


def test_stage3_loads_the_newest_or_the_named_original_checkpoint(original):
    _root, cfg, expt, weights = original
    assert same(Experiment(expt).load_model(cfg).state_dict(), weights[NEWEST])
    assert same(Experiment(expt).load_model(cfg, str(expt / "checkpoint" / OLDER)).state_dict(), weights[OLDER])
    assert locate_experiment(expt / "checkpoint" / OLDER) == (expt, str(expt / "checkpoint" / OLDER))
    assert locate_experiment(expt / "checkpoint") == (expt, str(expt / "checkpoint"))
    assert locate_experiment(expt) == (expt, None)


def test_stage3_through_run_sh_with_a_checkpoint_folder_and_the_recipe_config(original, tmp_path):
    root, _cfg, expt, _weights = original
    feats = tmp_path / "feats" / "mels"
    feats.mkdir(parents=True)
    mel = np.load(next((root / "data" / "demo" / "mels").glob("*.npy")))
    np.save(feats / "utt.npy", mel)
    # as the original's run.sh is used: the recipe's default config, -c, and a checkpoint folder as the experiment
    result = run_recipe("-s", "3", "-c", "egs/vocoder/diffusion/diffwave/exp_config.json", "--infer_mode",
                        "infer_from_feature", "--infer_feature_dir", str(tmp_path / "feats"),
                        "--infer_expt_dir", str(expt / "checkpoint" / OLDER), "--infer_output_dir", str(tmp_path / "out"))
    assert f"loaded {expt / 'checkpoint' / OLDER}" in result.stderr
    assert "preprocess.n_mel is 100, but the experiment was trained with 20" in result.stderr
    pred, rate = sf.read(tmp_path / "out" / "pred" / "utt.wav")
    assert rate == 8000 and len(pred) == mel.shape[1] * 64  # the experiment's rate and hop, not the config's


def test_recipe_config_gives_its_inference_section_only(original, tmp_path, caplog):
    _root, cfg, expt, _weights = original
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"preprocess": {"hop_size": 64, "n_mel": 80},
                                  "model": {"diffwave": {"residual_channels": 8}},
                                  "inference": {"batch_size": 3, "sampler": "full"}}))
    with caplog.at_level(logging.WARNING):
        merged = with_recipe_config(load_config(expt / "args.json"), recipe)
    assert merged.preprocess.n_mel == 20 and merged.inference.batch_size == 3 and merged.inference.sampler == "full"
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "preprocess.n_mel" in warned and "hop_size" not in warned and "residual_channels" not in warned
    assert with_recipe_config(cfg, None) is cfg


def trainer(cfg_path: Path, name: str, resume_type: str, checkpoint: str | None) -> DiffusionVocoderTrainer:
    reset_accelerate()
    return DiffusionVocoderTrainer(load_config(cfg_path), name, resume_type, checkpoint)


def copy_experiment(expt: Path, to: Path) -> Path:
    subprocess.run(["cp", "-r", str(expt), str(to)], check=True)
    return to


def test_resume_continues_an_original_run_without_unpickling_its_rng(original, tmp_path, caplog):
    root, _cfg, expt, weights = original
    expt = copy_experiment(expt, tmp_path / "old_exp")
    marker = tmp_path / "unpickled"
    (expt / "checkpoint" / NEWEST / "random_states_0.pkl").write_bytes(pickle.dumps(TouchOnLoad(marker)))
    cfg = json.loads((root / "config.json").read_text())
    cfg["log_dir"], cfg["train"]["max_steps"] = str(tmp_path), 122
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.INFO):
        run = trainer(tmp_path / "config.json", "old_exp", "resume", None)  # the newest of the experiment, as the original
    assert not marker.exists()
    assert "RNG stream restarts" in caplog.text
    assert (run.state.epoch, run.state.step, run.state.batch_in_epoch) == (4, 120, 0)
    assert same(run.accelerator.unwrap_model(run.model).state_dict(), weights[NEWEST])
    assert same(run.ema.shadow, weights[NEWEST])  # no EMA in the original: it starts from the loaded weights
    saved = torch.load(expt / "checkpoint" / NEWEST / "optimizer.bin", weights_only=True)
    state = run.optimizer.optimizer.state_dict()
    assert all(torch.equal(state["state"][i]["exp_avg"], saved["state"][i]["exp_avg"]) for i in saved["state"])
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.9)  # the decayed rate, via scheduler.bin
    assert run.scheduler.last_epoch == 1
    run.train()
    ours = list_checkpoints(expt / "checkpoint")
    assert read_state(ours[-1])["step"] == 122 and (ours[-1] / "state.json").is_file()
    # keep_last prunes only what this toolkit saved: the original's folders stay
    assert (expt / "checkpoint" / NEWEST).is_dir() and (expt / "checkpoint" / OLDER).is_dir()


def test_finetune_accepts_an_original_experiment_or_folder(original, tmp_path):
    root, _cfg, expt, weights = original
    cfg = json.loads((root / "config.json").read_text())
    cfg["log_dir"] = str(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for i, (source, expected) in enumerate(((expt, NEWEST), (expt / "checkpoint" / OLDER, OLDER))):
        run = trainer(tmp_path / "config.json", f"ft{i}", "finetune", str(source))
        assert run.state.step == 0 and same(run.accelerator.unwrap_model(run.model).state_dict(), weights[expected])
    reset_accelerate()


class Payload:
    pass


def test_pickled_objects_in_original_state_files_are_refused(original, tmp_path):
    root, _cfg, expt, _weights = original
    expt = copy_experiment(expt, tmp_path / "old_exp")
    folder = expt / "checkpoint" / NEWEST
    torch.save({"state": {}, "param_groups": [], "extra": Payload()}, folder / "optimizer.bin")
    cfg = json.loads((root / "config.json").read_text())
    cfg["log_dir"] = str(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"optimizer\.bin: refused"):
        trainer(tmp_path / "config.json", "old_exp", "resume", str(folder))
    reset_accelerate()


def test_multi_gpu_weights_lose_the_ddp_prefix(tmp_path):
    tensors = {"module.input_projection.weight": torch.ones(2, 1, 1), "module.output_projection.bias": torch.zeros(1)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert set(load_weights(tmp_path)) == {"input_projection.weight", "output_projection.bias"}


def test_a_renamed_original_folder_cannot_resume_but_says_why(original, tmp_path):
    _root, _cfg, expt, _weights = original
    renamed = tmp_path / "best"
    subprocess.run(["cp", "-r", str(expt / "checkpoint" / NEWEST), str(renamed)], check=True)
    with pytest.raises(CheckpointError, match="rename it back"):
        read_state(renamed)


# ----- the recipe's command line ----------------------------------------------------------------------------

def test_help_lists_every_flag_and_exits_zero():
    flags = set(re.findall(r"^\s+(--[a-z_]+)\)", RUN_SH.read_text(), flags=re.M))
    assert len(flags) > 25
    for option in ("--help", "-h"):
        result = run_recipe(option)
        assert result.returncode == 0 and result.stderr == ""
        missing = [f for f in flags if f not in result.stdout]
        assert not missing, missing
        assert all(short in result.stdout for short in ("-s, --stage", "-c, --config", "-n, --name"))


@pytest.mark.parametrize("args, message", [
    (["-s", "9"], "unknown --stage '9'"),
    (["-s", "2", "-n", "x", "-c", "nowhere.json"], "nowhere.json' does not exist"),
    (["-s", "1", "--infer_sampler", "fast"], "--infer_sampler does not apply to stage 1 (it is for stage 3)"),
    (["-s", "3", "--max_steps", "5"], "--max_steps does not apply to stage 3 (it is for stage 2)"),
    (["-s", "2", "-n", "x", "--checkpoint", "c"], "--checkpoint in stage 2 needs --resume_type resume or finetune"),
    (["-s", "3", "--infer_mode", "infer_from_audio", "--infer_audio_dir", ".", "--infer_expt_dir", "x",
      "--infer_mel_convention", "log10"], "--infer_mel_convention does not apply to infer_from_audio"),
    (["-s", "3", "--infer_precision", "fp8"], "--infer_precision must be auto, fp32, fp16 or bf16, got 'fp8'"),
    (["-s", "3", "--infer_sampler", "turbo"], "--infer_sampler must be fast, full, ddim or searched, got 'turbo'"),
])
def test_short_options_and_ignored_flags_are_errors(args, message):
    result = run_recipe(*args, check=False)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_steps_for_a_fixed_step_sampler_are_an_error(tmp_path):
    expt, _cfg = make_experiment(tmp_path)
    (tmp_path / "wavs").mkdir()
    base = ["-s", "3", "--infer_mode", "infer_from_audio", "--infer_audio_dir", str(tmp_path / "wavs"),
            "--infer_expt_dir", str(expt), "--infer_steps", "3"]
    for extra, sampler in (["--infer_sampler", "full"], "full"), ([], "fast"):  # [] : the config's default sampler
        result = run_recipe(*base, *extra, check=False)
        assert result.returncode == 1, result.stderr
        assert f"error: --infer_steps 3 does not apply to the {sampler} sampler" in result.stderr
    for steps in ("0", "51"):  # the message named no flag: "ddim steps must be in 1..50, got 0"
        result = run_recipe(*base[:-1], steps, "--infer_sampler", "ddim", check=False)
        assert result.returncode == 1 and f"error: --infer_steps {steps}: ddim takes 1 to 50 steps" in result.stderr


def test_steps_set_in_a_config_for_a_fixed_step_sampler_are_an_error(tmp_path):
    expt, _cfg = make_experiment(tmp_path)
    cfg = Experiment(expt).config()
    cfg.inference.steps = 3
    with pytest.raises(ConfigError, match=r"key 'inference.steps' \(3\) does not apply to the fast sampler"):
        vocoder_from_experiment(expt, cfg=cfg)
    cfg.inference.sampler = "ddim"
    assert len(vocoder_from_experiment(expt, cfg=cfg).plan.positions) == 3
    # the config's steps are its ddim sampler's: a caller (--infer_sampler fast) choosing a fixed-step sampler
    # replaces that sampler, and its steps with it, rather than being told to set the ddim the config already has
    assert vocoder_from_experiment(expt, cfg=cfg, sampler="fast").plan.kind == "ddpm"


def test_gpu_sets_the_devices_of_every_stage(tmp_path):
    """A `python` on PATH that records CUDA_VISIBLE_DEVICES: each stage must see --gpu, not the inherited value."""
    record = tmp_path / "seen"
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES" >> {record}\nexec {sys.executable} "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    expt, _cfg = make_experiment(tmp_path)
    (tmp_path / "wavs").mkdir()
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "7"}
    for args in (["-s", "1"], ["-s", "3", "--infer_mode", "infer_from_audio", "--infer_audio_dir", str(tmp_path / "wavs"),
                               "--infer_expt_dir", str(expt)], ["-s", "4", "--infer_expt_dir", str(expt)]):
        record.unlink(missing_ok=True)
        subprocess.run(["sh", str(RUN_SH), *args, "--gpu", "2"], cwd=REPO, env=env, capture_output=True, text=True)
        seen = record.read_text().split()
        assert "2" in seen and "7" not in seen, (args, seen)  # the last call is the stage itself


def test_benchmark_help_exits_zero():
    result = subprocess.run([sys.executable, "bins/vocoder/benchmark.py", "--help"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0 and "infer|train|preprocess" in result.stdout


def test_unknown_sampler_messages_list_every_sampler(tmp_path):
    cfg = tiny_cfg(tmp_path)
    for build in (lambda: Vocoder(cfg, build_diffwave(cfg), "turbo"), lambda: make_plan(cfg.model.diffwave, "turbo")):
        with pytest.raises(ConfigError, match="choose one of fast, full, ddim, searched"):
            build()
