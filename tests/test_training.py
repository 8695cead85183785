"""Stage 2 at production grade: exact resume, finetune, checkpoint policy, precision, non-finite
steps, EMA, TensorBoard, progress, and multi-process / two-"node" launches through run.sh.

A tiny DiffWave on one shared synthetic corpus (8 utterances at 8 kHz: 7 train, 1 test); most
runs are in-process, the launches are real `accelerate launch` subprocesses on gloo.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from models.vocoders.diffusion import device_policy
from models.vocoders.diffusion.device_policy import channels_last as channels_last_rule
from models.vocoders.diffusion.device_policy import refuse_graphed_accumulation
from models.vocoders.diffusion.diffusion_vocoder_dataset import EpochBatchSampler
from models.vocoders.diffusion.diffusion_vocoder_trainer import DiffusionVocoderTrainer
from models.vocoders.diffusion.experiment import Experiment
from models.vocoders.diffusion.stepper import HostCopy, make_optimizer
from models.vocoders.diffusion.train_state import EMA
from processors.preprocess import preprocess
from tests.recipe_helpers import RUN_SH, tiny_training_config
from utils.checkpoint import CheckpointError, list_checkpoints
from utils.config import ConfigError, load_config
from utils.synthetic import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One preprocessed corpus shared by every test (features only; experiments go elsewhere)."""
    root = tmp_path_factory.mktemp("train")
    write_corpus(root / "corpus", 2, 4, sample_rate=8000)
    preprocess(load_config(tiny_training_config(root, "base.json")), num_workers=1)
    return root


def config(corpus: Path, tmp_path: Path, **train: object) -> Path:
    """A config file for this test: its own log_dir, the shared features, `train` overrides."""
    base = json.loads((corpus / "base.json").read_text())
    base["log_dir"] = str(tmp_path / "ckpts")
    base["train"].update(train)
    path = tmp_path / f"config_{len(list(tmp_path.glob('config_*')))}.json"
    path.write_text(json.dumps(base))
    return path


def trainer(path: Path, name: str, resume_type: str | None = None, checkpoint: str | None = None) -> DiffusionVocoderTrainer:
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh accelerate state per in-process run
    GradientState._reset_state()
    return DiffusionVocoderTrainer(load_config(path), name, resume_type, checkpoint)


def newest(exp: Path) -> Path:
    return list_checkpoints(exp / "checkpoint")[-1]


def max_diff(a: Path, b: Path) -> float:
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    return max(float((left[k] - right[k]).abs().max()) for k in left)


def scalars(exp: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list] = {}
    for events in sorted(exp.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0, "audio": 0})
        acc.Reload()
        for kind, tags in acc.Tags().items():
            if kind in ("scalars", "images", "audio"):
                for tag in tags:
                    items = getattr(acc, {"scalars": "Scalars", "images": "Images", "audio": "Audio"}[kind])(tag)
                    found.setdefault(tag, []).extend(items)
    return found


@pytest.mark.parametrize("fused", [False, True], ids=["decided-on-host", "decided-on-device"])
def test_resume_is_exact_mid_epoch_and_from_one_checkpoint(corpus: Path, tmp_path: Path, fused: bool) -> None:
    # batch 2: 3 batches per epoch; accumulation 2: windows [0, 1] [2], so 2 optimizer steps per epoch.
    # Fused AdamW decides each step on the device (as on CUDA) and the trainer reads it a window later.
    cfg = config(corpus, tmp_path, batch_size=2, gradient_accumulation_step=2, max_grad_norm=1.0,
                 adamw={"lr": 1e-3, "fused": fused})
    logs = tmp_path / "ckpts"
    straight = trainer(cfg, "straight")
    straight.cfg.train.max_steps = 6
    straight.train()
    half = trainer(cfg, "resumed")
    half.cfg.train.max_steps = 3  # stops after the first window of epoch 1: mid-epoch
    half.train()
    stop = json.loads((newest(logs / "resumed") / "state.json").read_text())
    assert (stop["epoch"], stop["step"], stop["batch_in_epoch"]) == (1, 3, 2)
    rest = trainer(cfg, "resumed", "resume", str(logs / "resumed"))  # the experiment folder: newest checkpoint
    assert (rest.state.epoch, rest.state.step, rest.state.batch_in_epoch) == (1, 3, 2)
    rest.cfg.train.max_steps = 6
    rest.train()
    boundary = next(p for p in list_checkpoints(logs / "resumed" / "checkpoint") if p.name.startswith("epoch-0001_step-0000002"))
    other = trainer(cfg, "from_one", "resume", str(boundary))  # one checkpoint, at an epoch boundary
    other.cfg.train.max_steps = 6
    other.train()
    want = newest(logs / "straight")
    for exp in ("resumed", "from_one"):
        got = newest(logs / exp)
        assert got.name == want.name
        for weights in ("model.safetensors", "ema.safetensors"):
            assert max_diff(want / weights, got / weights) <= 1e-6, (exp, weights)
        assert json.loads((got / "state.json").read_text())["step"] == 6


@pytest.mark.parametrize("saved", [False, True], ids=["saved-multi-tensor", "saved-fused"])
def test_a_resume_uses_this_runs_adamw_kernel_not_the_checkpoints(corpus: Path, tmp_path: Path, saved: bool) -> None:
    """train.adamw.fused is this run's choice: a checkpoint saved with the other kernel (every checkpoint from before
    the setting existed, an fp16 run's) resumes, rather than the saved param group's `fused` overriding the config
    (fused steps with the device's skip flag then reached the single-tensor kernel, which refuses it)."""
    name = f"switch_{saved}"
    trainer(config(corpus, tmp_path, batch_size=2, max_steps=2, adamw={"lr": 1e-3, "fused": saved}), name).train()
    cfg = config(corpus, tmp_path, batch_size=2, max_steps=4, adamw={"lr": 1e-3, "fused": not saved})
    rest = trainer(cfg, name, "resume", str(tmp_path / "ckpts" / name))
    rest.train()
    assert rest.state.step == 4
    assert all(bool(group["fused"]) is (not saved) for group in rest.optimizer.param_groups)


def test_finetune_loads_weights_and_ema_only_and_names_a_mismatched_parameter(corpus: Path, tmp_path: Path) -> None:
    cfg = config(corpus, tmp_path, max_steps=2)
    trainer(cfg, "source").train()
    source = newest(tmp_path / "ckpts" / "source")
    tuned = trainer(cfg, "tuned", "finetune", str(tmp_path / "ckpts" / "source"))
    assert (tuned.state.step, tuned.state.epoch, tuned.state.batch_in_epoch) == (0, 0, 0)
    assert not tuned.optimizer.optimizer.state_dict()["state"]  # a fresh optimizer
    weights = load_file(str(source / "model.safetensors"))
    own = tuned.accelerator.unwrap_model(tuned.model).state_dict()
    assert all(torch.equal(own[k].cpu(), v) for k, v in weights.items())
    ema = load_file(str(source / "ema.safetensors"))
    assert all(torch.equal(tuned.ema.shadow[k].cpu(), v) for k, v in ema.items())

    wider = json.loads(cfg.read_text())
    wider["model"]["diffwave"]["residual_channels"] = 12
    (tmp_path / "wider.json").write_text(json.dumps(wider))
    with pytest.raises(CheckpointError, match=r"parameter 'input_projection\.\w+' has shape \(\d+,?\d*\), the model expects"):
        trainer(tmp_path / "wider.json", "wider", "finetune", str(source))


def test_checkpoint_policy_strides_keep_last_run_eval_and_tensorboard(corpus: Path, tmp_path: Path, capsys, caplog,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Four one-step epochs: stride 1 keeps its newest, stride 2 keeps all and runs the eval."""
    from torch.utils.data import dataloader

    started = []
    original = dataloader._MultiProcessingDataLoaderIter.__init__
    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "__init__",
                        lambda self, loader: started.append(loader) or original(self, loader))
    cfg = config(corpus, tmp_path, max_epoch=4, save_checkpoint_stride=[1, 2], keep_last=[1, -1], run_eval=[False, True],
                 dataloader={"num_worker": 1})
    caplog.set_level("INFO")
    run = trainer(cfg, "policy")
    run.train()
    exp = tmp_path / "ckpts" / "policy"
    assert [p.name[:23] for p in list_checkpoints(exp / "checkpoint")] == ["epoch-0002_step-0000002", "epoch-0004_step-0000004"]
    record = json.loads((exp / "checkpoint" / "ckpts.json").read_text())
    assert [r["kinds"] for r in record["checkpoints"]] == [["stride0", "stride1"], ["stride0", "stride1", "final"]]
    assert record["latest"].startswith("epoch-0004")
    assert started.count(run.train_loader) == 1  # the worker started once, not once per epoch

    tags = scalars(exp)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/steps_per_sec", "train/audio_sec_per_sec",
                "train/skipped_steps", "valid/loss", "eval/mel_l1", "eval/demo_spk1_003/pred",
                "eval/demo_spk1_003/gt", "eval/demo_spk1_003/mel_pred", "eval/demo_spk1_003/mel_gt"):
        assert tag in tags, tag
    assert [e.step for e in tags["eval/mel_l1"]] == [2, 4]  # stride 1 has run_eval false
    image = tags["eval/demo_spk1_003/mel_gt"][0]
    assert image.height >= 320 and image.width >= 640  # readable at TensorBoard's 1:1 size, not a thumbnail
    assert len(tags["valid/loss"]) == 4 and all(math.isfinite(e.value) for e in tags["valid/loss"])  # 1 test utt < batch

    err = capsys.readouterr().err
    assert "loss=" in err and "steps_s=" in err and "audio_s_s=" in err  # the tqdm bar
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(summaries) == 4 and "valid loss" in summaries[0] and "audio s/s" in summaries[0]
    assert any("torch threads per process" in r.getMessage() or "torch thread per process" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("fused", [False, True], ids=["decided-on-host", "decided-on-device"])
def test_step_based_saving_merges_with_epoch_and_final_saves(corpus: Path, tmp_path: Path, fused: bool) -> None:
    cfg = config(corpus, tmp_path, batch_size=2, max_steps=5, save_checkpoint_stride=[0], keep_last=[2],
                 save_checkpoints_steps=1, adamw={"lr": 1e-3, "fused": fused})
    trainer(cfg, "steps").train()
    folder = tmp_path / "ckpts" / "steps" / "checkpoint"
    kept = [json.loads((p / "state.json").read_text())["step"] for p in list_checkpoints(folder)]
    assert kept == [4, 5]
    record = json.loads((folder / "ckpts.json").read_text())["checkpoints"]
    assert record[-1]["kinds"] == ["steps", "final"]  # step 5 is saved once
    assert not list(folder.glob(".tmp-*"))


@pytest.mark.parametrize("fused", [False, True], ids=["decided-on-host", "decided-on-device"])
def test_a_wall_time_budget_stops_training_and_saves_the_last_state(corpus: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch, fused: bool) -> None:
    """train.max_minutes: a clock that ticks a second per reading passes the 6 s budget within a few steps; with
    steps decided on the device, the step in flight is settled before the window that would run past the budget."""
    clock = iter(range(1000))  # one "second" per reading of the clock
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    run = trainer(config(corpus, tmp_path, batch_size=2, max_steps=1000, max_minutes=0.1,
                         adamw={"lr": 1e-3, "fused": fused}), "budget")
    run.train()
    assert 1 <= run.state.step <= 6, run.state.step  # six clock readings pass the 6 s budget within a few steps
    last = json.loads((newest(tmp_path / "ckpts" / "budget") / "state.json").read_text())
    assert last["step"] == run.state.step
    record = json.loads((tmp_path / "ckpts" / "budget" / "checkpoint" / "ckpts.json").read_text())["checkpoints"]
    assert "final" in record[-1]["kinds"]


@pytest.mark.parametrize("fused", [False, True], ids=["decided-on-host", "decided-on-device"])
def test_a_budget_read_as_spent_at_any_check_ends_with_the_final_checkpoint(corpus: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            fused: bool) -> None:
    """With several processes the budget is a reduction read one check late, so it may first read as spent at
    any check, the one after validation included (that run ended with no checkpoint at all): every one saves."""
    for first_spent in range(1, 6):
        calls = iter(range(1, 1000))
        monkeypatch.setattr(DiffusionVocoderTrainer, "_out_of_time",
                            lambda self, calls=calls, first_spent=first_spent: next(calls) >= first_spent)
        name = f"spent{first_spent}"
        # batch 4: one window an epoch, so the checks cycle through its window and its end (after validation)
        run = trainer(config(corpus, tmp_path, batch_size=4, max_steps=1000, max_minutes=1, save_checkpoint_stride=[0],
                             adamw={"lr": 1e-3, "fused": fused}), name)
        run.train()
        folder = tmp_path / "ckpts" / name / "checkpoint"
        assert folder.is_dir(), f"budget first read as spent at check {first_spent}: no checkpoint"
        record = json.loads((folder / "ckpts.json").read_text())["checkpoints"]
        assert record[-1]["kinds"] == ["final"] and record[-1]["step"] == run.state.step >= 1, (first_spent, record)


def test_mixed_precision(corpus: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        trainer(config(corpus, tmp_path, mixed_precision="fp16", max_steps=2), "fp16").train()
        assert math.isfinite(json.loads((newest(tmp_path / "ckpts" / "fp16") / "state.json").read_text())["loss"])
    else:
        with pytest.raises(ConfigError, match=r"fp16.*needs a CUDA GPU"):
            trainer(config(corpus, tmp_path, mixed_precision="fp16"), "fp16")
    bf16 = trainer(config(corpus, tmp_path, mixed_precision="bf16", max_steps=2), "bf16")
    assert bf16.accelerator.mixed_precision == "bf16"
    bf16.train()
    assert math.isfinite(json.loads((newest(tmp_path / "ckpts" / "bf16") / "state.json").read_text())["loss"])


@pytest.mark.parametrize("fused", [False, True], ids=["decided-on-host", "decided-on-device"])
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(corpus: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, fused: bool) -> None:
    original = DiffusionVocoderTrainer._loss

    def poisoned(self: DiffusionVocoderTrainer, *args: object) -> torch.Tensor:
        loss = original(self, *args)
        return loss * float("nan") if self.state.step >= 2 else loss

    monkeypatch.setattr(DiffusionVocoderTrainer, "_loss", poisoned)
    cfg = config(corpus, tmp_path, max_steps=50, max_nonfinite_steps=3, adamw={"lr": 1e-3, "fused": fused})
    bad = trainer(cfg, "nan")
    with pytest.raises(FloatingPointError, match=r"3 optimizer steps in a row .* last good checkpoint .*step-0000002"):
        bad.train()
    exp = tmp_path / "ckpts" / "nan"
    last = newest(exp)  # epochs of skipped steps may save, but only the unchanged good weights
    assert json.loads((last / "state.json").read_text())["step"] == 2
    saved, saved_ema = load_file(str(last / "model.safetensors")), load_file(str(last / "ema.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())
    # the skipped steps left the weights, the EMA and Adam's step count where step 2 put them
    now = bad.accelerator.unwrap_model(bad.model).state_dict()  # on the run's device; the files load on the CPU
    assert all(torch.equal(now[k].cpu(), saved[k]) for k in saved)
    assert all(torch.equal(bad.ema.shadow[k].cpu(), saved_ema[k]) for k in saved_ema)
    assert all(int(s["step"]) == 2 for s in bad.optimizer.state_dict()["state"].values())
    assert [e.value for e in scalars(exp)["train/skipped_steps"]][-3:] == [1, 2, 3]
    norms = scalars(exp)["train/grad_norm"]  # the skipped steps' non-finite norms are left out of the plot
    assert [e.step for e in norms] == [1, 2] and all(math.isfinite(e.value) for e in norms)


def test_skips_next_to_due_saves_give_the_same_checkpoints_decided_on_host_or_device(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Non-finite windows mid-window, right before a due save and at an epoch's last window: the step read a
    window later gives the checkpoints, counters and logged steps of the step read at once."""
    original = DiffusionVocoderTrainer._loss
    bad = {(0, 1), (1, 4), (1, 6), (2, 0)}  # (epoch, batch in epoch); batch 1: 7 batches, windows [0 1] [2 3] [4 5] [6]

    def poisoned(self: DiffusionVocoderTrainer, *args: object) -> torch.Tensor:
        loss = original(self, *args)
        return loss * float("nan") if (self.state.epoch, self.state.batch_in_epoch) in bad else loss

    monkeypatch.setattr(DiffusionVocoderTrainer, "_loss", poisoned)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # CUDA: no atomics in the weight gradients
    seen = {}
    for fused in (False, True):
        cfg = config(corpus, tmp_path, batch_size=1, gradient_accumulation_step=2, max_steps=8, save_checkpoints_steps=2,
                     keep_last=[-1], max_grad_norm=1.0, adamw={"lr": 1e-3, "fused": fused})
        run = trainer(cfg, f"skips_{fused}")
        run.train()
        exp = tmp_path / "ckpts" / f"skips_{fused}"
        states = [json.loads((p / "state.json").read_text()) for p in list_checkpoints(exp / "checkpoint")]
        seen[fused] = ([(s["epoch"], s["step"], s["batch_in_epoch"], s["skipped_steps"]) for s in states],
                       [(e.step, e.value) for e in scalars(exp)["train/skipped_steps"]], newest(exp))
    assert seen[False][:2] == seen[True][:2]
    assert seen[True][0][-1] == (3, 8, 0, 4)  # max_steps at the end of epoch 2, after 4 skipped windows
    adam_steps = [{int(s["step"]) for s in torch.load(seen[fused][2] / "optimizer.pt", weights_only=True)["state"].values()}
                  for fused in (False, True)]
    assert adam_steps == [{8}, {8}]  # a skipped window moved no step count
    # The two AdamW kernels round alike on the CPU; on CUDA they are different kernels, so there the bound is a tenth
    # of one step's size: a skipped window applied, or an EMA moved by one, would still exceed it.
    bound = 1e-4 if torch.cuda.is_available() else 1e-6
    for weights in ("model.safetensors", "ema.safetensors"):
        assert max_diff(seen[False][2] / weights, seen[True][2] / weights) <= bound


def test_cuda_graph_compile_modes_are_refused_with_gradient_accumulation() -> None:
    """reduce-overhead / max-autotune replay CUDA graphs whose gradient buffers the next micro-batch overwrites
    (pytorch/pytorch#169545): refused with accumulation on CUDA, before any training."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ConfigError, match=rf"^cfg.json: train.compile_mode '{mode}' .*gradient_accumulation_step 2"):
            refuse_graphed_accumulation(mode, 2, cuda, "cfg.json")
        refuse_graphed_accumulation(mode, 1, cuda, "cfg.json")
        refuse_graphed_accumulation(mode, 2, cpu, "cfg.json")  # no CUDA graphs on the CPU
    for mode in ("default", "max-autotune-no-cudagraphs"):
        refuse_graphed_accumulation(mode, 4, cuda, "cfg.json")


def test_validation_runs_a_compiled_model_eagerly(corpus: Path, tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    run = trainer(config(corpus, tmp_path), "eager_validation")
    run.accelerator.unwrap_model(run.model).compile(backend="eager", dynamic=False)  # tracing only: fast
    run.compiled = True
    torch._dynamo.reset()
    counters.clear()
    assert math.isfinite(run.validate())
    assert counters["stats"]["unique_graphs"] == 0  # nothing traced, so nothing compiled


def test_ema_update_is_the_moving_average_of_every_float_tensor() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].num_batches_tracked += 5
    ema.update(model, step=100)  # past the warm-up: decay 0.9
    for name, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            assert torch.allclose(ema.shadow[name], 0.9 * before[name] + 0.1 * value, atol=1e-6), name
        else:
            assert torch.equal(ema.shadow[name], value), name


def test_a_gated_ema_update_moves_only_when_the_gate_is_open() -> None:
    model = torch.nn.Linear(3, 4)
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=100, gate=torch.tensor(False))
    assert all(torch.equal(ema.shadow[k], before[k]) for k in before)
    ema.update(model, step=100, gate=torch.tensor(True))
    assert torch.allclose(ema.shadow["weight"], 0.9 * before["weight"] + 0.1 * model.weight, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_steps_readings_reach_the_host_without_waiting_for_the_work_queued_after_them() -> None:
    copy = HostCopy(torch.arange(4.0, device="cuda"))
    big = torch.randn(8192, 8192, device="cuda")
    for _ in range(20):  # about a third of a second of fp32 matmuls, queued after the copy
        big = big @ big
    values = copy.read()
    assert not torch.cuda.current_stream().query(), "the matmuls were already done: the check proves nothing"
    assert values == [0.0, 1.0, 2.0, 3.0]


def test_the_fused_optimizer_is_chosen_per_device_and_refused_with_fp16(corpus: Path, tmp_path: Path) -> None:
    path = config(corpus, tmp_path)
    cfg = load_config(path)
    model = torch.nn.Linear(2, 2)
    assert not make_optimizer(model, cfg, torch.device("cpu"), "no").defaults["fused"]
    assert make_optimizer(model, cfg, torch.device("cuda"), "bf16").defaults["fused"]
    assert not make_optimizer(model, cfg, torch.device("cuda"), "fp16").defaults["fused"]
    cfg.train.adamw.fused = True
    with pytest.raises(ConfigError, match=rf"{path}: key 'train.adamw.fused' cannot be true with mixed_precision 'fp16'"):
        make_optimizer(model, cfg, torch.device("cuda"), "fp16")


def test_stage3_uses_ema_weights_by_default(corpus: Path, tmp_path: Path) -> None:
    cfg = config(corpus, tmp_path, max_steps=3)
    trainer(cfg, "ema").train()
    exp = tmp_path / "ckpts" / "ema"
    last = newest(exp)
    ema, raw = load_file(str(last / "ema.safetensors")), load_file(str(last / "model.safetensors"))
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    default = Experiment(exp).load_model(load_config(exp / "args.json")).state_dict()
    assert all(torch.equal(default[k], ema[k]) for k in ema)
    chosen = Experiment(exp).load_model(load_config(exp / "args.json"), use_ema=False).state_dict()
    assert all(torch.equal(chosen[k], raw[k]) for k in raw)


def test_the_loader_prefetches_across_epochs_from_one_iterator(corpus: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A new epoch's first batch is drawn (and loaded by the worker) before the last epoch ends, not after its
    validation: the next epoch's order depends only on (seed, epoch)."""
    events: list[tuple[str, int]] = []
    draw, validate = EpochBatchSampler._all_batches, DiffusionVocoderTrainer.validate
    monkeypatch.setattr(EpochBatchSampler, "_all_batches",
                        lambda self, epoch: events.append(("draw", epoch)) or draw(self, epoch))
    monkeypatch.setattr(DiffusionVocoderTrainer, "validate",
                        lambda self: events.append(("validate", self.state.epoch)) or validate(self))
    iterators = []
    original_iter = torch.utils.data.DataLoader.__iter__
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", lambda self: iterators.append(self) or original_iter(self))
    run = trainer(config(corpus, tmp_path, max_epoch=3, dataloader={"num_worker": 1}), "prefetch")
    run.train()
    assert run.state.epoch == 3 and iterators.count(run.train_loader) == 1
    assert events.index(("draw", 1)) < events.index(("validate", 1))  # epoch 1 drawn before epoch 0's validation


def test_a_resume_past_the_end_of_a_shorter_epoch_goes_on_with_the_next(corpus: Path, tmp_path: Path, recwarn) -> None:
    """A mid-epoch checkpoint resumed where an epoch has fewer batches (a larger batch, more processes, fewer
    utterances) has nothing left of its epoch: the epoch ends and the next one starts, as with an iterator per
    epoch (the remaining count went negative and the resume failed in itertools.islice)."""
    trainer(config(corpus, tmp_path, batch_size=1, max_steps=5), "shrunk").train()  # 7 batches: stops at batch 5
    rest = trainer(config(corpus, tmp_path, batch_size=4, max_steps=7), "shrunk", "resume",
                   str(tmp_path / "ckpts" / "shrunk"))
    assert (rest.state.epoch, rest.state.batch_in_epoch, len(rest.train_sampler)) == (0, 5, 1)
    rest.train()
    assert (rest.state.epoch, rest.state.step, rest.state.batch_in_epoch) == (3, 7, 0)  # epochs 1 and 2: a step each
    assert not [w for w in recwarn if "lr_scheduler.step" in str(w.message)]  # the decay was due: nothing to warn of


def test_validation_sampler_covers_every_item_once() -> None:
    shards = [list(EpochBatchSampler(5, 4, 0, rank, 2, shuffle=False, drop_last=False)) for rank in range(2)]
    assert sorted(i for shard in shards for batch in shard for i, _ in batch) == [0, 1, 2, 3, 4]
    alone = [list(EpochBatchSampler(1, 4, 0, rank, 2, shuffle=False, drop_last=False)) for rank in range(2)]
    assert [len(s) for s in alone] == [1, 0]
    train = [list(EpochBatchSampler(7, 2, 0, rank, 2)) for rank in range(2)]
    assert len(train[0]) == len(train[1]) == 1
    assert not {i for b in train[0] for i, _ in b} & {i for b in train[1] for i, _ in b}  # disjoint shards


# ----- launches through run.sh ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: Path, name: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(["bash", str(RUN_SH), "--stage", "2", "--config", str(cfg), "--name", name, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def listening(port: int) -> bool:
    import psutil

    return any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in psutil.net_connections("tcp"))


def finish(procs: list[subprocess.Popen], port: int) -> tuple[list[str], bool]:
    """Wait for every launch (3 min cap), watching whether `port` is listened on meanwhile."""
    seen, deadline = False, time.time() + 180
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        seen = seen or listening(port)
        time.sleep(0.1)
    outputs = []
    for p in procs:
        if p.poll() is None:
            p.kill()
        outputs.append(p.communicate()[0])
    return outputs, seen


def check_one_experiment(exp: Path, processes: int, step: int) -> None:
    checkpoints = list_checkpoints(exp / "checkpoint")
    assert checkpoints, "no checkpoint written"
    state = json.loads((checkpoints[-1] / "state.json").read_text())
    assert (state["num_processes"], state["step"]) == (processes, step)
    assert sorted(p.name for p in checkpoints[-1].glob("rng_*.pt")) == [f"rng_{r}.pt" for r in range(processes)]
    assert len(list(exp.glob("events.out.tfevents.*"))) == 1  # one writer
    assert not list((exp / "checkpoint").glob(".tmp-*"))


def test_two_processes_shard_data_save_once_and_use_the_port(corpus: Path, tmp_path: Path) -> None:
    # batch 2: 3 batches an epoch; two processes take one each (the odd one is dropped), so 2 epochs = 2 steps.
    cfg = config(corpus, tmp_path, batch_size=2, max_epoch=2, save_checkpoint_stride=[1], keep_last=[-1])
    port = free_port()
    (out,), seen = finish([launch(cfg, "ddp", "--gpu", "0,1", "--main_process_port", str(port))], port)
    assert f"process group: backend gloo, world size 2, rendezvous port {port}" in out, out[-3000:]
    assert seen, f"nothing listened on port {port} during training"
    exp = tmp_path / "ckpts" / "ddp"
    check_one_experiment(exp, 2, 2)
    assert [json.loads((p / "state.json").read_text())["step"] for p in list_checkpoints(exp / "checkpoint")] == [1, 2]
    assert out.count("INFO models.vocoders.diffusion.checkpointing: saved") == 2  # rank 0 only


def test_two_processes_stop_together_at_a_wall_time_budget(corpus: Path, tmp_path: Path) -> None:
    # the processes agree through a reduction read one check late: both stop, one final checkpoint, no hang
    cfg = config(corpus, tmp_path, batch_size=1, max_steps=100000, max_minutes=0.002, save_checkpoint_stride=[0])
    port = free_port()
    (out,), _seen = finish([launch(cfg, "budget", "--gpu", "0,1", "--main_process_port", str(port))], port)
    folder = tmp_path / "ckpts" / "budget" / "checkpoint"
    records = json.loads((folder / "ckpts.json").read_text())["checkpoints"]
    assert records[-1]["kinds"] == ["final"] and 1 <= records[-1]["step"] < 100000, out[-3000:]
    assert "Traceback" not in out and out.count("INFO models.vocoders.diffusion.checkpointing: saved") == 1


def test_busy_port_gives_a_clear_error(corpus: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(["bash", str(RUN_SH), "--stage", "2", "--config", str(config(corpus, tmp_path)),
                                 "--name", "busy", "--gpu", "0,1", "--main_process_port", str(port)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"--main_process_port {port} is already in use" in result.stderr


def test_two_nodes_on_one_machine_share_steps_and_one_checkpoint(corpus: Path, tmp_path: Path) -> None:
    cfg = config(corpus, tmp_path, batch_size=2, max_epoch=2, save_checkpoint_stride=[2])
    port = free_port()
    node = ("--gpu", "0", "--num_machines", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port))
    procs = [launch(cfg, "nodes", *node, "--machine_rank", str(rank)) for rank in range(2)]
    outputs, _ = finish(procs, port)
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "2 processes on 2 machines" in outputs[0]
    exp = tmp_path / "ckpts" / "nodes"
    check_one_experiment(exp, 2, 2)
    assert len(list_checkpoints(exp / "checkpoint")) == 1



def test_automatic_precision_and_compile_follow_the_gpus(fake_gpus, monkeypatch, caplog):
    """bf16 training only where every GPU of the launch computes it natively, torch.compile only where Triton
    targets them; the warning names the GPU that lacks bf16."""
    assert device_policy.training_precision("auto", cuda=False) == "no"
    fake_gpus(("Tesla T4", (7, 5)))
    assert device_policy.training_precision("auto", cuda=True) == "no"
    with caplog.at_level(logging.WARNING):
        assert device_policy.training_precision("bf16", cuda=True) == "bf16"
    assert "'bf16' on Tesla T4 (cuda:0, compute capability 7.5) is emulated" in caplog.text
    triton = importlib.util.find_spec("triton") is not None
    assert device_policy.compile_model("auto", torch.device("cuda")) == triton
    fake_gpus(("NVIDIA GeForce GTX 1080", (6, 1)))
    assert not device_policy.compile_model("auto", torch.device("cuda"))
    assert device_policy.compile_model(True, torch.device("cuda"))  # asked for: tried, and torch says why if it fails
    fake_gpus(("NVIDIA A100-SXM4-80GB", (8, 0)), ("Tesla V100", (7, 0)))
    assert device_policy.training_precision("auto", cuda=True) == "bf16"  # one process: cuda:0 only
    assert device_policy.training_precision("no", cuda=True) == "no"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine: the V100 trains too
    assert device_policy.training_precision("auto", cuda=True) == "no"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        device_policy.training_precision("bf16", cuda=True)
    assert "on Tesla V100 (cuda:1, compute capability 7.0)" in caplog.text


def test_channels_last_training_takes_the_same_steps(corpus: Path, tmp_path: Path) -> None:
    """`train.channels_last` changes how the convolutions run, not what is learned; checkpoints are the same kind.
    (fp32 without TF32, so that on a GPU too the two kernels' rounding stays far below the bound.)"""
    runs = {}
    for channels_last in (False, True):
        name = f"cl{int(channels_last)}"
        run = trainer(config(corpus, tmp_path, channels_last=channels_last, max_steps=3, mixed_precision="no",
                             tf32=False), name)
        assert run.accelerator.unwrap_model(run.model).channels_last is channels_last
        run.train()
        runs[channels_last] = newest(tmp_path / "ckpts" / name)
    assert max_diff(runs[False] / "model.safetensors", runs[True] / "model.safetensors") <= 1e-4
    narrow = trainer(config(corpus, tmp_path), "narrow")  # auto: a few channels, slower so on one thread: off
    assert narrow.accelerator.unwrap_model(narrow.model).channels_last is False
    path = config(corpus, tmp_path)
    wide = json.loads(path.read_text())
    wide["model"]["diffwave"]["residual_channels"] = 32
    path.write_text(json.dumps(wide))
    wide = trainer(path, "wide")  # auto: on the CPU from 32 channels, where it is faster; off on CUDA until measured
    assert wide.accelerator.unwrap_model(wide.model).channels_last is (not torch.cuda.is_available())


def test_channels_last_auto_follows_the_device_and_cuda_graphs() -> None:
    """Measured on an H200: channels-last wins on CUDA only when CUDA graphs replay the step; on the CPU from 32
    residual channels."""
    assert channels_last_rule("auto", cuda=False, channels=64) and not channels_last_rule("auto", cuda=False, channels=16)
    assert not channels_last_rule("auto", cuda=True, channels=64)
    assert channels_last_rule("auto", cuda=True, channels=64, graphed=True)
    assert not channels_last_rule("auto", cuda=True, channels=16, graphed=True)
    assert channels_last_rule(True, cuda=True, channels=8) and not channels_last_rule(False, cuda=False, channels=64)
