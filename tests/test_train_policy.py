"""Stage 2's choices that need no training run: automatic precision, compile and layout per GPU, the refusal of
CUDA graphs with accumulation, the EMA's arithmetic, the host's reads of a step and the data shards."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from models.vocoders.diffusion import device_policy
from models.vocoders.diffusion.device_policy import channels_last as channels_last_rule
from models.vocoders.diffusion.device_policy import refuse_graphed_accumulation
from models.vocoders.diffusion.diffusion_vocoder_dataset import EpochBatchSampler
from models.vocoders.diffusion.stepper import HostCopy
from models.vocoders.diffusion.train_state import EMA
from utils.config import ConfigError


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


def test_the_automatic_compile_mode_replays_cuda_graphs_only_where_they_were_measured() -> None:
    """One process on CUDA without accumulation: reduce-overhead (and so channels-last); else torch's default mode,
    and a mode asked for is kept (the accumulation check refuses a graphed one later, naming it)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def mode(device: torch.device, processes: int = 1, **train: object) -> str | None:
        return device_policy.compile_mode({"compile": True, **train}, device, processes)

    assert mode(cuda) == mode(cuda, compile_mode="auto") == "reduce-overhead"
    assert channels_last_rule("auto", True, 64, graphed=mode(cuda) in device_policy.CUDA_GRAPH_MODES)
    assert mode(cuda, gradient_accumulation_step=2) == mode(cuda, processes=2) == mode(cpu) == "default"
    assert mode(cuda, compile_mode="default") == "default"
    assert mode(cuda, gradient_accumulation_step=2, compile_mode="max-autotune") == "max-autotune"
    assert device_policy.compile_mode({"compile": False}, cuda, 1) is None


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


def test_validation_sampler_covers_every_item_once() -> None:
    shards = [list(EpochBatchSampler(5, 4, 0, rank, 2, shuffle=False, drop_last=False)) for rank in range(2)]
    assert sorted(i for shard in shards for batch in shard for i, _ in batch) == [0, 1, 2, 3, 4]
    alone = [list(EpochBatchSampler(1, 4, 0, rank, 2, shuffle=False, drop_last=False)) for rank in range(2)]
    assert [len(s) for s in alone] == [1, 0]
    train = [list(EpochBatchSampler(7, 2, 0, rank, 2)) for rank in range(2)]
    assert len(train[0]) == len(train[1]) == 1
    assert not {i for b in train[0] for i, _ in b} & {i for b in train[1] for i, _ in b}  # disjoint shards


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


def test_channels_last_auto_follows_the_device_and_cuda_graphs() -> None:
    """Measured on an H200: channels-last wins on CUDA only when CUDA graphs replay the step; on the CPU from 32
    residual channels."""
    assert channels_last_rule("auto", cuda=False, channels=64) and not channels_last_rule("auto", cuda=False, channels=16)
    assert not channels_last_rule("auto", cuda=True, channels=64)
    assert channels_last_rule("auto", cuda=True, channels=64, graphed=True)
    assert not channels_last_rule("auto", cuda=True, channels=16, graphed=True)
    assert channels_last_rule(True, cuda=True, channels=8) and not channels_last_rule(False, cuda=False, channels=64)
