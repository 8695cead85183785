"""Stage 3's engine options at their edges: compiled lengths, memory budgets, CUDA graphs, kernel errors, samplers.

CUDA-only choices are tested on the CPU with what torch.cuda reports faked."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from models.vocoders.diffusion import diffusion_vocoder_inference as inference
from models.vocoders.diffusion import fused
from models.vocoders.diffusion.device_policy import free_memory
from models.vocoders.diffusion.diffusion_vocoder_inference import Vocoder
from models.vocoders.diffusion.windowed import GraphedDenoiser, bytes_per_sample, least_window_bytes
from tests.test_inference import HOP, random_tiny_model, tiny_cfg
from utils.config import ConfigError
from utils.text import byte_size


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_tiny_model()


def mels(*frames: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(10, f, generator=gen) for f in frames]


def test_a_compiled_forward_is_one_graph_for_every_length(model, monkeypatch):
    """A static compile recompiled for each new length and, past dynamo's limit of 8, ran eagerly without a word.
    (The eager backend: dynamo's guards decide the recompiles, and it runs fast on the CPU.)"""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **options: compile_(module, backend="eager", **options))
    torch._dynamo.reset()
    counters.clear()
    inputs = mels(*range(30, 18, -1))
    names = [str(i) for i in range(len(inputs))]
    got = Vocoder(tiny_cfg(), model, "ddim", steps=2, device="cpu", engine="plain", compile=True)(inputs, names)
    assert counters["stats"]["unique_graphs"] == 1
    want = Vocoder(tiny_cfg(), model, "ddim", steps=2, device="cpu", engine="plain")(inputs, names)
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w)


def fake_cuda_memory(monkeypatch, free: int, reserved: int, allocated: int) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)


def test_the_gpu_budget_counts_what_the_caching_allocator_holds_unused(model, monkeypatch):
    """Nothing in stage 3 empties PyTorch's cache, so the driver's free memory alone shrank after every batch: the
    memory reserved but unallocated is as good as free for the next one."""
    fake_cuda_memory(monkeypatch, free=10 << 30, reserved=6 << 30, allocated=1 << 30)
    assert free_memory(torch.device("cuda")) == 15 << 30
    vocoder = Vocoder(tiny_cfg(), model, device="cpu")
    vocoder.device = torch.device("cuda")
    assert vocoder._window_budget(2, 1000) == int(0.8 * (15 << 30)) - 8 * 2 * 1000 * 4


@pytest.mark.parametrize("engine", ["plain", "fused"])
def test_a_budget_too_small_names_one_that_fits_in_readable_units(model, engine):
    """It said "budget -0.00 GiB is too small for batch 2: a window needs at least 0.00 GiB", then named no budget
    that would do; the one it names now runs, in windows."""
    if engine == "fused" and not fused.available(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1")
    mel = torch.stack(mels(400, 400))
    for kib in (1, 450):
        small = Vocoder(tiny_cfg(), model, device="cpu", engine=engine, gpu_memory_gib=kib / 2**20)
        with pytest.raises(ConfigError, match=rf"^inference memory budget {kib}.0 KiB is too small for a batch of 2 x "
                                              r"6400 samples: the sampler's buffers need 400.0 KiB and the smallest "
                                              r"window [0-9.]+ [KM]iB \(set inference.gpu_memory_gib to at least "
                                              r"[0-9.e-]+, or lower the batch size\)") as refused:
            small._denoiser(mel, None)
    named = float(re.search(r"at least ([0-9.e-]+),", str(refused.value)).group(1))
    fits = Vocoder(tiny_cfg(), model, device="cpu", engine=engine, gpu_memory_gib=named)
    assert len(fits._denoiser(mel, None).windows) > 1  # it runs, in windows: the smallest budget, not the largest
    assert [byte_size(n) for n in (512, 3 << 10, 5 << 20, 3 << 29)] == ["512 B", "3.0 KiB", "5.0 MiB", "1.50 GiB"]
    for bad in (-1, float("inf"), 1e300, "abc"):  # inf and 1e300 overflowed, "abc" failed in float()
        with pytest.raises(ConfigError, match=re.escape(f"gpu_memory_gib must be a positive number of GiB, got {bad!r}")):
            Vocoder(tiny_cfg(), model, device="cpu", gpu_memory_gib=bad)


@pytest.mark.parametrize(("batch", "frames"), [(1, 372194), (16, 237571), (16, 293004), (3, 5)])
def test_the_named_budget_is_taken_for_long_batches_too(model, batch: int, frames: int) -> None:
    """Rounded to the nearest at four digits the named GiB fell short: 1.816 for 1.8163 GiB (16 x 3801136 samples),
    refused in turn. Checked on the budget alone: nothing this long is allocated."""
    length = frames * HOP
    with pytest.raises(ConfigError, match="at least") as refused:
        Vocoder(tiny_cfg(), model, device="cpu", engine="plain", gpu_memory_gib=2**-30)._window_budget(batch, length)
    named = float(re.search(r"at least ([0-9.e+-]+),", str(refused.value)).group(1))
    fits = Vocoder(tiny_cfg(), model, device="cpu", engine="plain", gpu_memory_gib=named)
    need = 8 * batch * length * 4 + least_window_bytes(model, batch, length, "plain", fits.dtype)
    assert fits._window_budget(batch, length) > 0 and need <= named * 2**30 <= 1.001 * need  # enough, not much more
    assert inference.gib_at_least(3 << 30) == "3" and inference.gib_at_least((3 << 30) + 1) == "3.001"


def test_a_host_that_does_not_say_its_free_memory_gets_a_fixed_budget(monkeypatch):
    """macOS has no /proc/meminfo nor SC_AVPHYS_PAGES, Windows no os.sysconf: the bf16 CPU path died there."""
    from models.vocoders.diffusion import device_policy

    def unreadable(*_args: object, **_kwargs: object) -> None:
        raise OSError(2, "No such file or directory")

    def unknown_name(_name: str) -> int:
        raise ValueError("unrecognized configuration name")

    monkeypatch.setattr("builtins.open", unreadable)
    monkeypatch.setattr(device_policy.os, "sysconf", unknown_name)
    assert free_memory(torch.device("cpu")) == device_policy.CPU_MEMORY_FALLBACK


def test_half_precision_on_the_cpu_runs_in_windows_within_the_memory_budget(model, monkeypatch):
    """bf16 on the CPU took the plain forward over the whole batch at once: 5 GiB for 409,600 samples of the base
    model, and no budget applied. Its windows give the unbounded forward's audio within bf16's rounding; the default
    budget is half the host memory available."""
    inputs, names = mels(400, 250), ["a", "b"]
    monkeypatch.setattr(inference, "free_memory", lambda device: 1 << 40)
    whole = Vocoder(tiny_cfg(), model, "ddim", steps=3, batch_size=2, device="cpu", precision="bf16")
    assert whole._window_budget(2, 6400) == (1 << 39) - 8 * 2 * 6400 * 4
    assert len(whole._denoiser(torch.stack(mels(400, 400)), None).windows) == 1
    budget = 8 * 2 * 6400 * 4 + 2 * bytes_per_sample(model, "plain", torch.bfloat16) * 1200
    windowed = Vocoder(tiny_cfg(), model, "ddim", steps=3, batch_size=2, device="cpu", precision="bf16",
                       gpu_memory_gib=budget / 2**30)
    assert windowed.engine == "plain" and len(windowed._denoiser(torch.stack(mels(400, 400)), None).windows) >= 5
    for got, want in zip(windowed(inputs, names), whole(inputs, names), strict=True):
        assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


def graph_windows(model, cuda_graph: bool | str, budget: int, frames: int = 100) -> tuple[bool, int]:
    """Whether a (faked) CUDA Vocoder would capture a graph for a batch of 2, and over how many windows."""
    vocoder = Vocoder(tiny_cfg(), model, device="cpu", engine="plain", gpu_memory_gib=(budget + 8 * 2 * frames * HOP * 4) / 2**30)
    vocoder.device, vocoder.cuda_graph = torch.device("cuda"), cuda_graph
    denoise = vocoder._denoiser(torch.stack(mels(frames, frames)), None)
    graphed = isinstance(denoise, GraphedDenoiser)
    return graphed, len((denoise.denoise if graphed else denoise).windows)


def test_a_captured_graph_sizes_its_windows_for_its_own_pool(model):
    """The eager first step leaves its blocks cached and the capture allocates the working set again in the graph's
    pool: a graph over windows sized for the whole budget used 1.5x it. With a graph the windows are sized for
    twice the working set; `auto` captures only where one window still holds the batch."""
    one = 2 * bytes_per_sample(model, "plain", None) * 100 * HOP  # one window of the batch's 1600 samples, once
    assert graph_windows(model, False, one) == (False, 1)
    graphed, windows = graph_windows(model, True, one)
    assert graphed and windows >= 2
    assert graph_windows(model, True, 2 * one) == (True, 1)
    assert graph_windows(model, "auto", one) == (False, 1)  # no graph rather than a graph over several windows
    assert graph_windows(model, "auto", 2 * one) == (True, 1)
    # shorter than two halos: no graphed window fit the budget that holds the input once, and `auto` was refused
    # (naming a budget too small for the graph), where it runs ungraphed
    four = 2 * bytes_per_sample(model, "plain", None) * 4 * HOP
    assert graph_windows(model, "auto", four, frames=4) == (False, 1)
    with pytest.raises(ConfigError, match="too small for a batch of 2 x 64 samples"):  # forced: a named budget
        graph_windows(model, True, four, frames=4)


def test_compile_applies_to_the_plain_engine_only(model, caplog):
    """The tiled and fused engines ignored `compile: true` while the Vocoder said it compiled: a chosen engine is
    refused with it, an automatic one says which engine it took."""
    for engine in ("tiled", "fused") if fused.available(torch.device("cpu")) else ("tiled",):  # fused: the interpreter
        with pytest.raises(ConfigError, match=rf"^inference.compile applies to the plain engine only, not '{engine}'"):
            Vocoder(tiny_cfg(), model, device="cpu", engine=engine, compile=True)
    with caplog.at_level(logging.WARNING):
        vocoder = Vocoder(tiny_cfg(), model, device="cpu", compile=True)
    assert vocoder.engine == "tiled"
    assert "inference.compile: the automatic engine here is tiled, which is not compiled" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Vocoder(tiny_cfg(), model, device="cpu", engine="plain", compile=True)
    assert not caplog.text


def test_a_cuda_graph_asked_for_on_the_cpu_is_refused(model):
    """`inference.cuda_graph: true` with the CPU was accepted and ignored: no graph, and no word of it."""
    with pytest.raises(ConfigError, match=r"^inference.cuda_graph: true needs a CUDA GPU, and this run vocodes on the cpu; "
                                          r"set it to auto or false$"):
        Vocoder(tiny_cfg(), model, device="cpu", cuda_graph=True)
    for setting in ("auto", False):
        Vocoder(tiny_cfg(), model, device="cpu", cuda_graph=setting)


def test_the_fused_engine_is_only_picked_where_one_dots_weights_fit_in_a_blocks_shared_memory(fake_gpus, monkeypatch):
    """fp32 at 128 channels needs 128 KiB of shared memory for one dot's weights: on an RTX 4090 (99 KiB a block)
    every variant compiled, then failed at its launch, before the automatic engine fell back; a chosen one stopped
    mid-run. Now the automatic engine takes the plain forward there and a chosen one is refused in one line."""
    from tests.test_fused import random_model

    monkeypatch.setattr(fused, "available", lambda device: device.type == "cuda")
    wide = random_model(channels=fused.MAX_CHANNELS, layers=2).cpu()
    vocoder = Vocoder(tiny_cfg(), wide, device="cpu")
    vocoder.device = torch.device("cuda")
    for gpu, fp32_engine in ((("NVIDIA GeForce RTX 4090", (8, 9)), "plain"), (("NVIDIA A100-SXM4-80GB", (8, 0)), "fused")):
        fake_gpus(gpu)
        for dtype, engine in ((torch.float16, "fused"), (torch.bfloat16, "fused"), (None, fp32_engine)):
            vocoder.dtype = dtype
            assert vocoder._pick_engine("auto") == engine, (gpu, dtype)
    fake_gpus(("NVIDIA GeForce RTX 4090", (8, 9)))
    vocoder.dtype = None
    with pytest.raises(ConfigError, match=r"^inference engine 'fused': a model of 128 residual channels in float32 needs "
                                          r"128 KiB of shared memory a block for one dot's weights, more than the 99 KiB "
                                          r"NVIDIA GeForce RTX 4090 offers \(16-bit precisions take half\); use engine "
                                          r"'auto' or 'plain'$"):
        vocoder._pick_engine("fused")
    assert fused.too_wide(wide, torch.float32, torch.device("cpu")) is None  # the interpreter has no such limit
    cuda = torch.device("cuda")
    for channels, fits in ((64, True), (65, False)):  # padded to 128 from 65 on: the docs said from 80
        assert (fused.too_wide(random_model(channels=channels, layers=1), torch.float32, cuda) is None) == fits
    fake_gpus(("Tesla T4", (7, 5)))  # 64 KiB a block: 16 bits at 128 channels do not fit either
    assert fused.too_wide(wide, torch.float16, cuda).endswith("needs 64 KiB of shared memory a block for one dot's "
                                                       "weights, all of the 64 KiB Tesla T4 offers")  # no 16-bit hint
    assert fused.too_wide(wide, torch.float32, cuda).endswith("more than the 64 KiB Tesla T4 offers (16-bit precisions "
                                                       "take half)")
