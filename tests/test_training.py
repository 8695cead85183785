"""Stage 2 at production grade: exact resume, finetune, checkpoint policy, precision, non-finite
steps, EMA, TensorBoard, progress and the loader, as in-process runs of a tiny DiffWave on one shared
synthetic corpus (tests/training_kit.py). Launches: tests/test_launches.py; choices without a run:
tests/test_train_policy.py.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.vocoders.diffusion.diffusion_vocoder_dataset import EpochBatchSampler
from models.vocoders.diffusion.diffusion_vocoder_trainer import DiffusionVocoderTrainer
from models.vocoders.diffusion.experiment import Experiment
from models.vocoders.diffusion.stepper import make_optimizer
from tests.training_kit import config, max_diff, mean_diff, newest, preprocessed_corpus, scalars, trainer
from utils.checkpoint import CheckpointError, list_checkpoints
from utils.config import ConfigError, load_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return preprocessed_corpus(tmp_path_factory.mktemp("train"))


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


def test_finetune_loads_weights_and_ema_only_and_refuses_another_shape(corpus: Path, tmp_path: Path, caplog) -> None:
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
    with pytest.raises(ConfigError, match=rf"residual_channels is 12, but {source} was trained with \d+; a finetune keeps"):
        trainer(tmp_path / "wider.json", "wider", "finetune", str(source))
    assert not (tmp_path / "ckpts" / "wider").exists()  # a refused setup leaves no folder behind
    bare = tmp_path / "bare" / "model.safetensors"  # weights alone: no config to compare, the load names the parameter
    bare.parent.mkdir()
    shutil.copy(source / "model.safetensors", bare)
    with pytest.raises(CheckpointError, match=r"parameter 'input_projection\.\w+' has shape \(\d+,?\d*\), the model expects"):
        trainer(tmp_path / "wider.json", "wider", "finetune", str(bare))
    cut = tmp_path / "cut" / source.name  # a hand-cut config copy: not compared, said, and the load still refuses
    shutil.copytree(source, cut)
    (cut / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"parameter 'input_projection\.\w+' has shape"):
        trainer(tmp_path / "wider.json", "wider", "finetune", str(cut))
    assert "the config it was trained under is unusable" in caplog.text

    longer = json.loads(cfg.read_text())  # another noise schedule (or mel), the same shapes: allowed, and said
    longer["model"]["diffwave"] = {**longer["model"].get("diffwave", {}), "noise_schedule_factors": [1e-4, 0.05, 60]}
    (tmp_path / "longer.json").write_text(json.dumps(longer))
    trainer(tmp_path / "longer.json", "longer", "finetune", str(source))
    assert (f"finetuning {source} under other settings than it was trained with: model.diffwave.noise_schedule_factors "
            "[0.0001, 0.05, 50] -> [0.0001, 0.05, 60]") in caplog.text


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
        monkeypatch.setattr(DiffusionVocoderTrainer, "_cut_short",
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
    # The two AdamW kernels round alike on the CPU. On CUDA they are different kernels, and Adam's normalised step
    # turns their rounding of a near-zero gradient into as much as 0.64 of a step (6.4e-4 at lr 1e-3 on an H200,
    # run 8) for a few weights; so there the mean difference is bounded, to a twentieth of a step: a skipped window
    # applied moves every weight by up to a step.
    for weights in ("model.safetensors", "ema.safetensors"):
        if torch.cuda.is_available():
            assert mean_diff(seen[False][2] / weights, seen[True][2] / weights) <= 5e-5
        else:
            assert max_diff(seen[False][2] / weights, seen[True][2] / weights) <= 1e-6


def test_validation_runs_a_compiled_model_eagerly(corpus: Path, tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    run = trainer(config(corpus, tmp_path), "eager_validation")
    run.accelerator.unwrap_model(run.model).compile(backend="eager", dynamic=False)  # tracing only: fast
    run.compiled = True
    torch._dynamo.reset()
    counters.clear()
    assert math.isfinite(run.validate())
    assert counters["stats"]["unique_graphs"] == 0  # nothing traced, so nothing compiled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_training_resumes_exactly_with_ema_clipping_and_evaluation(corpus: Path, tmp_path: Path) -> None:
    """Stage 2's default on one GPU replays CUDA graphs (compile_mode auto): the features a long run leans on
    (EMA, clipping, evaluation at a save, validation, resume) run under it, and a resume equals a straight run."""
    cfg = config(corpus, tmp_path, compile=True, max_grad_norm=1.0, ema_decay=0.9, run_eval=[True],
                 save_checkpoint_stride=[1])
    straight = trainer(cfg, "straight")
    assert straight.compile_mode == "reduce-overhead" and straight.compiled
    straight.cfg.train.max_steps = 6
    straight.train()
    half = trainer(cfg, "resumed")
    half.cfg.train.max_steps = 3
    half.train()
    rest = trainer(cfg, "resumed", "resume", str(tmp_path / "ckpts" / "resumed"))
    rest.cfg.train.max_steps = 6
    rest.train()
    want, got = newest(tmp_path / "ckpts" / "straight"), newest(tmp_path / "ckpts" / "resumed")
    assert got.name == want.name
    for weights in ("model.safetensors", "ema.safetensors"):
        assert max_diff(want / weights, got / weights) <= 1e-6, weights
    assert math.isfinite(rest.validate())


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


def test_a_mid_epoch_resume_under_another_accumulation_or_batch_size(corpus: Path, tmp_path: Path, caplog) -> None:
    """Saved at batch 1 without accumulation, resumed with 2 micro-batches a step: the first window took the one batch
    left of a window aligned to the epoch's start and divided its loss by 2 (a step at half the gradient). A changed
    batch size shifts the epoch's position (counted in the saving run's batches), a changed seed its order, without a
    word: now warned."""
    trainer(config(corpus, tmp_path, batch_size=2, max_steps=4, save_checkpoints_steps=1), "accum").train()
    assert newest(tmp_path / "ckpts" / "accum").name.startswith("epoch-0001_step-0000004")  # batch 1 of epoch 1
    rest = trainer(config(corpus, tmp_path, batch_size=1, gradient_accumulation_step=2, max_steps=5, random_seed=7),
                   "accum", "resume")
    assert "saved at batch 1 of its epoch with train.batch_size 2 and is resumed with 1" in caplog.text
    assert "saved at batch 1 of its epoch with train.random_seed 114514 and is resumed with 7" in caplog.text
    rest.train()
    assert json.loads((newest(tmp_path / "ckpts" / "accum") / "state.json").read_text())["batch_in_epoch"] == 3


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
    wide = trainer(path, "wide")  # auto: on the CPU from 32 channels, where it is faster; on CUDA only with graphs
    assert wide.accelerator.unwrap_model(wide.model).channels_last is (not torch.cuda.is_available())
