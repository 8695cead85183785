"""Stage 3 synthesis: exact chunking, exact length-grouped batching, seeded samplers, the FLOP count."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks.inference import flops_per_sample
from models.vocoders.diffusion import device_policy, fused
from models.vocoders.diffusion import diffusion_vocoder_inference as inference
from models.vocoders.diffusion.chunked import ChunkedDenoiser
from models.vocoders.diffusion.device_policy import inference_precision
from models.vocoders.diffusion.diffusion_vocoder_inference import Vocoder
from models.vocoders.diffusion.diffwave.diffwave import build_diffwave
from tests.tiny_experiment import model_cfg
from utils.config import ConfigError

HOP = 16


def tiny_cfg() -> object:
    return model_cfg(hop=HOP, residual_layers=6, dilation_cycle_length=3)


def random_tiny_model() -> torch.nn.Module:
    """Random non-trivial weights: every layer and the (normally zero-initialised) output matter."""
    torch.manual_seed(0)
    net = build_diffwave(tiny_cfg()).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return net


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_tiny_model()


def padded_batch(frames: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    mel = torch.zeros(len(frames), 10, max(frames))
    audio = torch.zeros(len(frames), max(frames) * HOP)
    for i, f in enumerate(frames):
        mel[i, :, :f] = torch.randn(10, f, generator=gen)
        audio[i, : f * HOP] = torch.randn(f * HOP, generator=gen)
    return mel, audio, torch.tensor(frames) * HOP


@pytest.mark.parametrize("chunk", [5, 37, 100, 10_000])
@pytest.mark.parametrize("cache_bytes", [0, 20_000, 1 << 30])
def test_chunked_forward_equals_full_length_forward(model, chunk, cache_bytes):
    """Chunks smaller than the halo (14 here), odd sizes, no/partial/full conditioner cache, over two steps."""
    mel, audio, _ = padded_batch([25])
    denoise = ChunkedDenoiser(model, mel, None, chunk=chunk, cache_bytes=cache_bytes, tile=64)
    for step in (torch.tensor([3.5]), torch.tensor([0.0])):  # the second step reuses the cache
        with torch.no_grad():
            full = model(audio, step, mel)
        assert (denoise(audio, step) - full).abs().max() < 1e-4
    assert full.abs().max() > 0.1


def test_chunked_forward_keeps_length_masking_exact(model):
    mel, audio, lengths = padded_batch([25, 18, 6])
    step = torch.tensor([2.0, 7.25, 40.0])
    with torch.no_grad():
        full = model(audio, step, mel, lengths)
    out = ChunkedDenoiser(model, mel, lengths, chunk=33, cache_bytes=30_000)(audio, step)
    for i, n in enumerate(lengths.tolist()):
        assert (out[i, :n] - full[i, :n]).abs().max() < 1e-4


def synthesize(model, sampler: str, seed: int, batch_size: int, chunk_size: int = 65536, names=("a", "b", "c", "d")):
    mels = four_mels()[0]
    steps = 4 if sampler == "ddim" else None  # fast and full have theirs
    vocoder = Vocoder(tiny_cfg(), model, sampler, steps=steps, batch_size=batch_size, seed=seed, device="cpu",
                      chunk_size=chunk_size, cache_gib=1e-5)
    return vocoder(mels, list(names))


@pytest.mark.parametrize("sampler", ["fast", "full", "ddim"])
def test_sampler_is_seeded_batched_and_chunked_exactly(model, sampler):
    """Same seed same waveform; another seed another; batches grouped by length and chunking change nothing."""
    alone = synthesize(model, sampler, seed=7, batch_size=1)
    again = synthesize(model, sampler, seed=7, batch_size=1)
    grouped = synthesize(model, sampler, seed=7, batch_size=3, chunk_size=50)
    other = synthesize(model, sampler, seed=8, batch_size=1)
    assert [len(a) for a in alone] == [23 * HOP, 9 * HOP, 17 * HOP, 9 * HOP]
    for a, b, g, o in zip(alone, again, grouped, other, strict=True):
        assert (a == b).all()
        assert abs(a - g).max() < 1e-4
        assert abs(a - o).max() > 0.01
    assert abs(alone[1] - alone[3]).max() > 0.01  # equal-length utterances get their own noise


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("engine", ["fused", "plain"])
def test_a_second_gpu_vocodes_what_the_first_does(model, engine):
    """Triton launches, streams and CUDA graph captures follow the current device, not the tensors': on cuda:1 the
    kernel ran on cuda:0's pointers and a graph captured nothing (each replay returned the last step's output)."""
    mels, names = four_mels()
    out = [Vocoder(tiny_cfg(), copy.deepcopy(model), "fast", batch_size=2, seed=3, device=device, engine=engine, precision="fp32",
                   cuda_graph=True)(mels, names) for device in ("cuda:0", "cuda:1")]
    assert torch.cuda.current_device() == 0
    for first, second in zip(*out, strict=True):
        assert abs(first - second).max() < 1e-5


def test_vocoder_takes_sampler_and_steps_from_its_options(model):
    assert Vocoder(tiny_cfg(), model, "ddim", steps=3, device="cpu").plan.steps == 3
    assert Vocoder(tiny_cfg(), model, "full", device="cpu").plan.steps == 50
    assert Vocoder(tiny_cfg(), model, "fast", device="cpu").plan.steps == 6


def test_flop_count_matches_the_layer_shapes(model):
    c, mels, layers = 8, 10, 6
    per_layer = 2 * (c * 2 * c * 3 + mels * 2 * c + c * 2 * c)
    upsampler = mels * 2 * 3 * 8 / 4 * (1 + 1 / 4)  # 3 x 8 kernel, stride 4, at audio and at audio / 4 rate
    expected = 2 * c + layers * per_layer + 2 * c * c + 2 * c + upsampler
    assert flops_per_sample(model, mels) == pytest.approx(expected)


def four_mels() -> tuple[list[torch.Tensor], list[str]]:
    mel, _, _ = padded_batch([23, 9, 17, 9])
    return [mel[i, :, :f] for i, f in enumerate([23, 9, 17, 9])], ["a", "b", "c", "d"]


def test_default_precision_is_fp16_on_gpus_with_tensor_cores_and_fp32_elsewhere(model, fake_gpus, caplog):
    """bf16 set by hand is kept where the GPU only emulates it, with the warning stage 2 gives there (it gave none)."""
    assert Vocoder(tiny_cfg(), model, device="cpu").precision == "fp32"
    fake_gpus(("NVIDIA GeForce GTX 1080", (6, 1)), ("NVIDIA H100", (9, 0)))
    assert inference_precision("auto", torch.device("cuda")) == "fp32"  # cuda:0, whose fp16 is slow
    assert inference_precision("auto", torch.device("cuda", 1)) == "fp16"
    device_policy._warn_emulated_bf16.cache_clear()  # once a process and GPU
    with caplog.at_level(logging.WARNING):
        assert inference_precision("bf16", torch.device("cuda", 1)) == "bf16"
        assert not caplog.text
        assert inference_precision("bf16", torch.device("cuda")) == "bf16"
    assert "'bf16' on NVIDIA GeForce GTX 1080 (cuda:0, compute capability 6.1) is emulated" in caplog.text


@pytest.mark.skipif(fused.triton is None, reason="needs Triton")
def test_the_automatic_engine_is_fused_only_where_tritons_dots_use_tensor_cores(model, fake_gpus):
    """Before Ampere, Triton 3 compiles the kernel's dots to scalar FMAs (a T4 build spills 3-9 KB a thread): cuDNN's
    plain forward keeps the tensor cores there. A fused engine chosen by hand still runs."""
    fake_gpus(("Tesla T4", (7, 5)), ("NVIDIA A10", (8, 6)), ("NVIDIA H200", (9, 0)))
    picked = []
    for index in range(3):
        vocoder = SimpleNamespace(device=torch.device("cuda", index), model=model, dtype=torch.float16, chunk_size=0)
        picked.append(Vocoder._pick_engine(vocoder, "auto"))
    assert picked == ["plain", "fused", "fused"]
    chosen = SimpleNamespace(device=torch.device("cuda", 0), model=model, dtype=torch.float16)
    assert Vocoder._pick_engine(chosen, "fused") == "fused"


def test_the_configs_precision_is_the_default_and_a_bad_one_names_its_file(model, tmp_path):
    cfg = tiny_cfg()
    cfg.inference = {"precision": "bf16"}
    assert Vocoder(cfg, model, device="cpu").precision == "bf16"
    assert Vocoder(cfg, model, device="cpu", precision="fp32").precision == "fp32"
    cfg.inference = {"precision": "fp8"}
    cfg.config_path = str(tmp_path / "exp.json")
    with pytest.raises(ConfigError, match=r"exp\.json: inference\.precision: unknown precision 'fp8'"):
        Vocoder(cfg, model, device="cpu")


def test_an_automatic_half_precision_that_overflows_is_redone_in_fp32(model, monkeypatch, caplog):
    """As a GPU's auto fp16 would: the batch is vocoded again in fp32 and the rest stay there. A precision the
    user chose is kept, overflow and all."""
    mels, names = four_mels()
    want = Vocoder(tiny_cfg(), model, batch_size=2, device="cpu", precision="fp32", engine="plain")(mels, names)
    monkeypatch.setattr(inference, "inference_precision", lambda setting, device: "bf16" if setting == "auto" else setting)
    forward = type(model).forward

    def overflows_under_autocast(self, *args):
        out = forward(self, *args)
        return out * float("inf") if torch.is_autocast_enabled("cpu") else out

    monkeypatch.setattr(type(model), "forward", overflows_under_autocast)
    vocoder = Vocoder(tiny_cfg(), model, batch_size=2, device="cpu")
    assert vocoder.precision == "bf16"
    with caplog.at_level(logging.WARNING):
        got = vocoder(mels, names)
    assert vocoder.precision == "fp32" and "bf16 synthesis overflowed" in caplog.text
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w)
    caplog.clear()
    chosen = Vocoder(tiny_cfg(), model, batch_size=2, device="cpu", precision="bf16")
    with caplog.at_level(logging.WARNING):
        chosen(mels, names)
    assert chosen.precision == "bf16" and "non-finite noise predictions in bf16" in caplog.text


class Rejected:
    """FusedDiffWave on a GPU whose compiler rejects the kernel at its first launch (in `rejects` precisions;
    in the others its noise prediction overflows)."""

    rejects = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype) -> None:
        self.net, self.dtype = net, dtype

    def conditioner(self, mel: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        return self.net.spectrogram_upsampler(mel, frames).transpose(1, 2).contiguous()

    def projected_bytes(self, samples: int) -> int:
        return 1 << 62  # never fits: the mel rows go to the kernel

    def projected(self, cond: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a projection that does not fit was computed")

    def __call__(self, audio: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        if self.dtype in self.rejects:
            raise fused.KernelError("the fused kernel failed on this GPU (CompilationError: no bf16 dot on sm_75)")
        return torch.full_like(audio, float("nan"))


def test_a_fused_kernel_this_gpu_cannot_compile_gives_way_to_the_plain_forward(model, monkeypatch, caplog):
    """The automatic engine falls back (with a warning) where Triton rejects the kernel; a chosen one fails."""
    monkeypatch.setattr(fused, "FusedDiffWave", Rejected)
    mels, names = four_mels()
    want = Vocoder(tiny_cfg(), model, batch_size=2, device="cpu", engine="plain")(mels, names)
    vocoder = Vocoder(tiny_cfg(), model, batch_size=2, device="cpu")
    vocoder.engine = "fused"  # what the automatic choice is on a CUDA GPU with Triton
    with caplog.at_level(logging.WARNING):
        got = vocoder(mels, names)
    assert vocoder.engine == "plain" and "failed on this GPU" in caplog.text and "plain forward instead" in caplog.text
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w)
    chosen = Vocoder(tiny_cfg(), model, batch_size=2, device="cpu")
    chosen.engine, chosen.chosen["engine"] = "fused", True  # as `inference.engine: fused` would set them on a GPU
    with pytest.raises(fused.KernelError, match="failed on this GPU"):
        chosen(mels, names)


def test_a_half_precision_overflow_then_a_kernel_the_gpu_rejects_ends_on_the_plain_forward(model, monkeypatch):
    """Both automatic: fp16 overflows on the fused engine, whose fp32 variant this GPU cannot compile."""
    monkeypatch.setattr(Rejected, "rejects", (torch.float32,))
    monkeypatch.setattr(fused, "FusedDiffWave", Rejected)
    monkeypatch.setattr(inference, "inference_precision", lambda setting, device: "bf16" if setting == "auto" else setting)
    mels, names = four_mels()
    want = Vocoder(tiny_cfg(), model, batch_size=2, device="cpu", precision="fp32", engine="plain")(mels, names)
    vocoder = Vocoder(tiny_cfg(), model, batch_size=2, device="cpu")
    vocoder.engine = "fused"
    got = vocoder(mels, names)
    assert (vocoder.precision, vocoder.engine) == ("fp32", "plain")
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w)


def test_an_overflow_redone_in_fp32_leaves_a_fused_kernel_whose_fp32_weights_do_not_fit(model, monkeypatch, caplog):
    """fp16 at 128 channels fits an RTX 4090's shared memory, fp32 does not (fused.too_wide): the fp32 redo of an
    overflowed batch launched the fused kernel there anyway, and a chosen `engine: fused` stopped mid-run with its
    KernelError (the automatic one first compiled every variant, each failing). It now goes to the plain forward."""
    monkeypatch.setattr(Rejected, "rejects", (torch.float32,))
    monkeypatch.setattr(fused, "FusedDiffWave", Rejected)
    monkeypatch.setattr(fused, "too_wide", lambda net, dtype=torch.float32, device=None:
                        "fp32 does not fit" if dtype == torch.float32 else None)
    monkeypatch.setattr(inference, "inference_precision", lambda setting, device: "bf16" if setting == "auto" else setting)
    mels, names = four_mels()
    want = Vocoder(tiny_cfg(), model, batch_size=2, device="cpu", precision="fp32", engine="plain")(mels, names)
    vocoder = Vocoder(tiny_cfg(), model, batch_size=2, device="cpu")
    vocoder.engine, vocoder.chosen["engine"] = "fused", True  # as `inference.engine: fused` would set them on a GPU
    with caplog.at_level(logging.WARNING):
        got = vocoder(mels, names)
    assert (vocoder.precision, vocoder.engine) == ("fp32", "plain")
    assert "vocoded again in fp32 on the plain forward (fp32 does not fit)" in caplog.text
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w)


def test_a_batch_that_is_not_finite_in_any_precision_is_no_overflow(model, monkeypatch, caplog):
    """Tried in fp32 and said so, but the run keeps the faster precision (the next batch may be fine)."""
    monkeypatch.setattr(inference, "inference_precision", lambda setting, device: "bf16" if setting == "auto" else setting)
    forward, calls = type(model).forward, []

    def diverged(self, *args):
        calls.append(torch.is_autocast_enabled("cpu"))
        return forward(self, *args) * float("nan")

    monkeypatch.setattr(type(model), "forward", diverged)
    mels, names = four_mels()
    vocoder = Vocoder(tiny_cfg(), model, batch_size=4, device="cpu")
    with caplog.at_level(logging.WARNING):
        first = vocoder(mels, names)
        vocoder(mels, names)
    assert calls == ([True] * 6 + [False] * 6) * 2  # each batch: 6 steps in bf16, again in fp32
    assert vocoder.precision == "bf16" and not vocoder.overflowed and all(np.isnan(a).all() for a in first)
    warning = ("non-finite noise predictions in bf16 and in fp32 for the batch with a: its audio is noise (the model's "
               "output is not finite for these mels)")
    assert [r.getMessage() for r in caplog.records] == [warning, warning]


@pytest.mark.parametrize("device, message", [("foo", "not a device name"), ("mps", "cpu or cuda only"),
                                             ("meta", "cpu or cuda only"), ("cuda:7", "visible; use --device cpu")])
def test_a_device_synthesis_cannot_use_is_a_config_error(device, message):
    with pytest.raises(ConfigError, match=rf"^device '{device}': .*{message}"):
        inference.pick_device(device)


def test_the_tiled_engine_refuses_a_half_precision_it_would_not_compute_in(model):
    with pytest.raises(ConfigError, match="engine 'tiled' computes in fp32 only, not bf16"):
        Vocoder(tiny_cfg(), model, engine="tiled", precision="bf16")
    assert Vocoder(tiny_cfg(), model, engine="tiled", precision="fp32").precision == "fp32"
