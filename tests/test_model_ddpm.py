"""The DiffWave network and the DDPM maths."""

import multiprocessing
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from models.vocoders.diffusion import ddpm
from models.vocoders.diffusion.ddpm import add_noise, alpha_cum, fractional_steps, make_plan, sample, training_betas
from models.vocoders.diffusion.diffwave import diffwave
from models.vocoders.diffusion.diffwave.diffwave import SpectrogramUpsampler, build_diffwave
from tests.tiny_experiment import model_cfg
from utils.config import ConfigError, load_config

RECIPE = Path(__file__).resolve().parents[1] / "egs/vocoder/diffusion/diffwave/exp_config.json"


def expected_parameter_count(n_mel: int, c: int, layers: int, steps_embed: int = 128, hidden: int = 512) -> int:
    """Counted from the architecture's layer shapes, independently of the module code."""
    embedding = steps_embed * hidden + hidden + hidden * hidden + hidden
    upsampler = 2 * (3 * 32 + 1)
    block = (c * 2 * c * 3 + 2 * c) + (hidden * c + c) + (n_mel * 2 * c + 2 * c) + (c * 2 * c + 2 * c)
    return (c + c) + embedding + upsampler + layers * block + (c * c + c) + (c + 1)


def test_base_config_parameter_names_and_count():
    model = build_diffwave(load_config(RECIPE))
    names = {n for n, _ in model.named_parameters()}
    for name in ("input_projection.weight", "diffusion_embedding.projection1.weight", "diffusion_embedding.projection2.bias",
                 "spectrogram_upsampler.conv1.weight", "spectrogram_upsampler.conv2.bias",
                 "residual_layers.29.dilated_conv.weight", "residual_layers.0.diffusion_projection.weight",
                 "residual_layers.0.conditioner_projection.weight", "residual_layers.0.output_projection.bias",
                 "skip_projection.weight", "output_projection.weight"):
        assert name in names
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(100, 64, 30)
    assert model.receptive_halo == 3 * (1 + 2 + 4 + 8 + 16 + 32 + 64 + 128 + 256 + 512)
    assert [layer.dilated_conv.dilation[0] for layer in model.residual_layers][:11] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1]


def test_output_shape_and_fractional_steps_accepted():
    model = build_diffwave(model_cfg())
    audio, mel = torch.randn(3, 7 * 16), torch.randn(3, 10, 7)
    assert model(audio, torch.tensor([0, 10, 49]), mel).shape == (3, 112)
    assert model(audio, torch.tensor([0.5, 10.25, 48.9]), mel).shape == (3, 112)


@pytest.mark.parametrize("factors", [[8, 8], [4, 3], [5]])
def test_the_upsampler_computes_its_transposed_convolutions(factors: list[int]) -> None:
    """Its matmul form against the stored ConvTranspose2d layers run as such (the checkpoints' layers), values and
    gradients, odd factors included."""
    torch.manual_seed(0)
    up = SpectrogramUpsampler(factors)
    for p in up.parameters():
        torch.nn.init.normal_(p, std=0.5)
    mel = torch.randn(2, 7, 9, dtype=torch.float64, requires_grad=True)
    up = up.double()
    x, length = mel.unsqueeze(1), mel.shape[-1]
    for i, factor in enumerate(factors, start=1):
        length *= factor
        x = torch.nn.functional.leaky_relu(getattr(up, f"conv{i}")(x)[..., :length], 0.4)
    reference = x.squeeze(1)
    out = up(mel)
    assert out.shape == reference.shape and torch.allclose(out, reference, atol=1e-12)
    grad = torch.randn_like(out)
    mine = torch.autograd.grad((out * grad).sum(), [mel, *up.parameters()])
    theirs = torch.autograd.grad((reference * grad).sum(), [mel, *up.parameters()])
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(mine, theirs, strict=True))


def test_upsample_factors_must_multiply_to_hop():
    with pytest.raises(ConfigError, match="multiply to 12"):
        build_diffwave(model_cfg(upsample_factors=[4, 3]))


def test_alpha_cum_and_training_noise():
    cfg = model_cfg()
    betas = training_betas(cfg.model.diffwave)
    cum = alpha_cum(betas)
    assert len(betas) == 50 and betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.05)
    assert torch.allclose(cum, torch.tensor(np.cumprod(1 - np.linspace(1e-4, 0.05, 50))))
    x0, eps = torch.ones(2, 5), torch.full((2, 5), 2.0)
    xt = add_noise(x0, eps, torch.tensor([0, 49]), cum)
    for row, t in enumerate((0, 49)):
        expected = float(cum[t].sqrt()) + 2.0 * float((1 - cum[t]).sqrt())
        assert torch.allclose(xt[row], torch.full((5,), expected), atol=1e-6)


def test_fast_schedule_steps_match_brute_force_inversion():
    train = training_betas(model_cfg().model.diffwave)
    infer = torch.tensor([0.0001, 0.001, 0.01, 0.05, 0.2, 0.5], dtype=torch.float64)
    steps = fractional_steps(train, infer)
    grid = torch.linspace(0, 49, 49 * 2000 + 1, dtype=torch.float64)
    curve = alpha_cum(train).sqrt()
    low = grid.floor().long().clamp(max=48)
    interpolated = curve[low] + (curve[low + 1] - curve[low]) * (grid - low)
    for step, target in zip(steps, alpha_cum(infer).sqrt(), strict=False):
        brute = float(grid[(interpolated - target).abs().argmin()])
        assert step == pytest.approx(brute, abs=1e-3)
    assert steps[0] == 0 and torch.all(steps[1:] > steps[:-1])


def pad_batch(mels):
    frames = torch.tensor([m.shape[-1] for m in mels])
    padded = torch.zeros(len(mels), mels[0].shape[0], int(frames.max()))
    for i, m in enumerate(mels):
        padded[i, :, : m.shape[-1]] = m
    return padded, frames


@pytest.mark.parametrize("sampler", ["fast", "full", "ddim"])
def test_batched_sampling_equals_one_by_one(sampler):
    torch.manual_seed(0)
    model = build_diffwave(model_cfg()).eval()
    torch.nn.init.normal_(model.output_projection.weight, std=0.3)
    plan = make_plan(model_cfg().model.diffwave, sampler, steps=4 if sampler == "ddim" else None)
    mels = [torch.randn(10, 9), torch.randn(10, 23), torch.randn(10, 14)]
    padded, frames = pad_batch(mels)
    lengths = frames * 16
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batch = sample(lambda x, s: model(x, s, padded, lengths), plan, (3, int(lengths.max())), lengths=lengths, generators=gens)
    for i, mel in enumerate(mels):
        alone = sample(lambda x, s, m=mel: model(x, s, m[None]), plan, (1, mel.shape[-1] * 16),
                       generators=[torch.Generator().manual_seed(i + 1)])
        assert torch.allclose(batch[i, : mel.shape[-1] * 16], alone[0], atol=1e-5)
        assert alone.abs().max() > 0.01  # a real signal, not a trivially equal zero


@pytest.mark.parametrize("steps", [1, 2, 4, 50])
def test_every_ddim_walk_starts_at_the_last_training_step(steps):
    """The walk starts from pure noise, the last training step's level. One step walked training step 0 alone, whose
    update barely moves its input: the 'audio' was the starting noise (correlation 0.99999 with it)."""
    walk = make_plan(model_cfg().model.diffwave, "ddim", steps).walk()
    assert len(walk) == steps and walk[0].position == 49 and (steps == 1 or walk[-1].position == 0)
    assert steps > 1 or walk[0].x_scale > 1.5  # one step: x0 at sqrt(alpha_cum) 0.53, not x itself


def test_unknown_sampler_and_impossible_ddim_steps_are_config_errors():
    with pytest.raises(ConfigError, match="unknown sampler"):
        make_plan(model_cfg().model.diffwave, "dpm")
    for steps in (0, 51):  # 0 is not "the default"
        with pytest.raises(ConfigError, match=rf"ddim steps must be in 1..50, got {steps}"):
            make_plan(model_cfg().model.diffwave, "ddim", steps)


@pytest.mark.parametrize("sampler, steps, betas, message", [
    ("fast", 3, None, r"^sampler 'fast' takes no steps \(its steps are the config's model.diffwave.inference_noise"),
    ("full", 3, None, r"^sampler 'full' takes no steps \(it walks every training step\)"),
    ("ddim", 3, [0.1], r"^sampler 'ddim' takes no betas"),
    ("searched", None, None, r"^sampler 'searched' needs its searched schedule"),
    ("fast", None, [], r"^an empty noise schedule"),
    ("searched", 2, [], r"^an empty noise schedule"),
    ("searched", 2, [0.01, 0.1, 0.5], r"^sampler 'searched' takes the steps of its schedule \(3\), not 2"),
])
def test_steps_or_betas_a_sampler_would_ignore_are_config_errors(sampler, steps, betas, message):
    """Each ran before: fast with 3 steps ran its 6, searched without a schedule ran the fast one, and an empty
    schedule returned the initial noise unclamped."""
    with pytest.raises(ConfigError, match=message):
        make_plan(model_cfg().model.diffwave, sampler, steps, betas)
    assert make_plan(model_cfg().model.diffwave, "searched", 2, [0.01, 0.5]).steps == 2


@pytest.mark.parametrize("pointwise", ["convolution", "matmul"])
@pytest.mark.parametrize("padded", [False, True])
def test_channels_last_computes_the_same_noise_and_gradients(padded, pointwise, monkeypatch, request):
    """`channels_last` (the residual stack as NHWC images) is a way to compute, not another network: on a GPU,
    cuDNN's NHWC kernels against its NCHW ones (TF32 off, so that both are fp32), with the 1x1 convolutions as
    convolutions or as matmuls over the images' memory (`pointwise_matmul`, CUDA's way)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    request.addfinalizer(partial(torch.set_float32_matmul_precision, torch.get_float32_matmul_precision()))
    torch.set_float32_matmul_precision("highest")
    monkeypatch.setattr(diffwave, "POINTWISE_MATMUL_DEVICES", {device.type} if pointwise == "matmul" else set())
    torch.manual_seed(0)
    net = build_diffwave(model_cfg(10, 16, residual_channels=8, residual_layers=6, dilation_cycle_length=3))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)  # the zero-initialised output projection too: every weight matters
    net = net.to(device)
    mel, audio, steps = torch.randn(3, 10, 20), torch.randn(3, 320), torch.tensor([3.0, 7.5, 1.0])
    mel, audio, steps = mel.to(device), audio.to(device), steps.to(device)
    lengths = torch.tensor([320, 200, 96], device=device) if padded else None
    results = []
    for channels_last in (False, True):
        net.zero_grad()
        net.channels_last = channels_last
        noise = net(audio, steps, mel, lengths)
        (noise.square() * torch.linspace(0, 1, 320, device=device)).sum().backward()
        results.append((noise.detach(), {name: p.grad.clone() for name, p in net.named_parameters()}))
    (first, first_grads), (last, last_grads) = results
    assert last.shape == first.shape == (3, 320) and torch.allclose(last, first, atol=1e-5, rtol=1e-5)
    for name, grad in first_grads.items():
        assert torch.allclose(last_grads[name], grad, atol=1e-5 * float(grad.abs().max()), rtol=1e-4), name


def _draw_in_child(queue) -> None:
    queue.put(ddpm._noise((3, 50), None, [torch.Generator().manual_seed(s) for s in range(3)]).tolist())


def test_a_forked_child_draws_batch_noise_after_its_parent_did():
    """The noise threads are the parent's: a child forked after a batch was drawn gets its own (it hung without)."""
    parent = ddpm._noise((3, 50), None, [torch.Generator().manual_seed(s) for s in range(3)])
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_draw_in_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=60) == parent.tolist()
    finally:
        child.join(10)
        child.kill()


def test_noise_needs_a_generator_per_item_and_lengths_that_fit():
    plan = make_plan(model_cfg().model.diffwave, "fast")
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    with pytest.raises(ValueError, match="2 noise generators for a batch of 4"):
        sample(lambda x, s: x, plan, (4, 100), generators=gens)
    with pytest.raises(ValueError, match=r"lengths \[100, 101\] do not fit a batch of shape \(2, 100\)"):
        sample(lambda x, s: x, plan, (2, 100), lengths=torch.tensor([100, 101]), generators=gens)


def test_one_generator_shared_by_several_items_draws_in_item_order(monkeypatch):
    """The items' threads would take its numbers in any order (they did, now and then)."""
    monkeypatch.setattr(ddpm, "_drawers", lambda: pytest.fail("a shared generator drawn from on several threads"))
    sizes = [20000, 10, 20000, 0, 20000, 7]
    shared = torch.Generator().manual_seed(3)
    noise = ddpm._noise((len(sizes), 20000), sizes, [shared] * len(sizes))
    again = torch.Generator().manual_seed(3)
    for row, n in zip(noise, sizes, strict=True):
        assert torch.equal(row[:n], torch.randn(n, generator=again)) and not row[n:].any()


def test_a_thread_still_sampling_at_interpreter_exit_finishes():
    """Python shuts its thread pools before it waits for other threads: the noise is then drawn in the caller."""
    script = ("import threading, torch\nfrom models.vocoders.diffusion import ddpm\nfrom tests.tiny_experiment import model_cfg\n"
              "plan = ddpm.make_plan(model_cfg().model.diffwave, 'full')\n"
              "def work():\n    gens = [torch.Generator().manual_seed(i) for i in range(2)]\n"
              "    print(tuple(ddpm.sample(lambda a, s: a * 0.1, plan, (2, 50_000), 'cpu', None, gens).shape))\n"
              "threading.Thread(target=work).start()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.strip() == "(2, 50000)", done.stderr[-2000:]


class Stillborn:
    """A thread pool whose threads cannot start (a process at its thread limit): `submit` queues the work, then
    raises; a thread that starts later would run what was queued."""

    def __init__(self) -> None:
        self.queued = []

    def submit(self, fn, *args):
        self.queued.append((fn, args))
        raise RuntimeError("can't start new thread")


def test_a_row_queued_to_a_thread_that_never_started_is_drawn_once(monkeypatch):
    pool = Stillborn()
    monkeypatch.setattr(ddpm, "_drawers", lambda: pool)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    noise = ddpm._noise((3, 1000), None, gens)
    kept = noise.clone()
    for fn, args in pool.queued:  # the queued copy runs late, in a thread started afterwards
        fn(*args)
    assert torch.equal(noise, kept) and len(pool.queued) == 1
    for s, row, gen in zip((1, 2, 3), noise, gens, strict=True):
        fresh = torch.Generator().manual_seed(s)
        assert torch.equal(row, torch.randn(1000, generator=fresh))
        assert torch.equal(torch.randn(5, generator=gen), torch.randn(5, generator=fresh))  # drawn once


def test_a_failing_draw_is_raised_after_the_others():
    gens = [torch.Generator().manual_seed(1), "not a generator", torch.Generator().manual_seed(3)]
    with pytest.raises(TypeError):
        ddpm._noise((3, 1000), None, gens)
