"""The fused Triton residual layers and the memory-bounded windows equal the plain DiffWave forward.

Without a GPU the kernel runs under Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1);
on a CUDA machine the same tests run the compiled kernel.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models.vocoders.diffusion import fused, windowed
from models.vocoders.diffusion.ddpm import make_plan, sample
from models.vocoders.diffusion.diffusion_vocoder_inference import FiniteWatch, Vocoder
from models.vocoders.diffusion.diffwave.diffwave import build_diffwave
from models.vocoders.diffusion.windowed import GraphedDenoiser, WindowedDenoiser, bytes_per_sample
from tests.tiny_experiment import model_cfg
from utils.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not fused.available(DEVICE), reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
HOP = 16
# On a GPU the tests pin one kernel variant (each variant has its own test below) instead of tuning every shape.
VARIANT = {"BLOCK_T": 64, "MERGED": True} if DEVICE.type == "cuda" else None
# The merged and split dot layouts, each checked on a GPU (an earlier multi-tile variant once erred by 3.6% there).
VARIANTS = [VARIANT, {"BLOCK_T": 128, "MERGED": False, "num_warps": 8}] if DEVICE.type == "cuda" else [None]
# Floors of the relative error: fp32 dots run as TF32 on a GPU (a 10-bit mantissa, as fp16's), bf16 keeps 7 bits.
# Above the floor, the fused kernel may err as much as the plain forward under autocast does in that precision.
TOLERANCE = {torch.float32: 1e-2 if DEVICE.type == "cuda" else 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def cfg(channels: int, n_mel: int, layers: int = 4, cycle: int = 2) -> object:
    return model_cfg(n_mel, HOP, residual_channels=channels, residual_layers=layers, dilation_cycle_length=cycle,
                     inference_noise_schedule=[0.001, 0.05, 0.5])


def random_model(channels: int = 16, n_mel: int = 20, **kwargs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_diffwave(cfg(channels, n_mel, **kwargs)).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.25)
    return net.to(DEVICE)


def batch(frames: list[int], n_mel: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A padded batch of random mels and audio, and its lengths in samples. Under the interpreter every 32-sample
    tile of every item costs about 40 ms a layer, so the layer tests take [10, 5] frames (160 and 80 samples): the
    shorter item ends inside a 32- and a 64-sample tile and leaves whole tiles of padding, as [30, 17] did."""
    gen = torch.Generator().manual_seed(seed)
    mel = torch.zeros(len(frames), n_mel, max(frames))
    audio = torch.zeros(len(frames), max(frames) * HOP)
    for i, f in enumerate(frames):
        mel[i, :, :f] = torch.randn(n_mel, f, generator=gen)
        audio[i, : f * HOP] = torch.randn(f * HOP, generator=gen)
    return mel.to(DEVICE), audio.to(DEVICE), (torch.tensor(frames) * HOP).to(DEVICE)


def relative_errors(out: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor) -> list[float]:
    """Per item: the RMS error over its valid samples, relative to the batch's RMS output. (An item's own
    output can nearly cancel, and rounding relative to a near-zero signal says nothing.) NaN or inf fails."""
    valid = [(out[i, :n], ref[i, :n]) for i, n in enumerate(lengths.tolist())]
    scale = float(torch.cat([r for _, r in valid]).pow(2).mean().sqrt())
    errors = []
    for got, want in valid:
        assert torch.isfinite(got).all()
        errors.append(float((got - want).pow(2).mean().sqrt()) / scale)
    return errors


def relative_error(out: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor) -> float:
    return max(relative_errors(out, ref, lengths))


def exact(model: torch.nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """The plain forward in float64 on the CPU: the reference every precision is measured against."""
    wide = copy.deepcopy(model).cpu().double()
    with torch.no_grad():
        return wide(*(x.cpu().double() if x.is_floating_point() else x.cpu() for x in inputs)).to(DEVICE).float()


def within_rounding(got: torch.Tensor, model: torch.nn.Module, dtype: torch.dtype, *inputs: torch.Tensor) -> None:
    """As close to the exact result as the floor, or as the plain forward in that precision on this device gets."""
    ref, lengths = exact(model, *inputs), inputs[-1]
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype != torch.float32):
        rounded = model(*inputs).float()  # on a GPU fp32 convolutions run as TF32 by default
    errors = relative_errors(got, ref, lengths)
    allowed = [max(TOLERANCE[dtype], 1.5 * e) for e in relative_errors(rounded, ref, lengths)]
    assert all(e < a for e, a in zip(errors, allowed, strict=True)), (errors, allowed)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("channels", "n_mel"), [(16, 20), (12, 7), (16, 100)])
def test_fused_layers_equal_the_plain_forward(dtype, channels, n_mel, variant):
    """Padded channel counts (12 -> 16), mel rows in one chunk (7 -> 16, 20 -> 32 bins) and in three (100 -> 64 + 32
    + 16), a padded batch with its length mask, two steps."""
    model = random_model(channels, n_mel)
    mel, audio, lengths = batch([10, 5], n_mel)
    net = fused.FusedDiffWave(model, dtype, variant)
    cond = net.conditioner(mel, lengths // HOP)
    for step in (torch.tensor([3.0, 3.0]), torch.tensor([41.25, 0.5])):
        step = step.to(DEVICE)
        within_rounding(net(audio, step, cond, lengths), model, dtype, audio, step, mel, lengths)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("channels", "n_mel"), [(12, 7), (16, 100)])
def test_a_projected_conditioner_computes_the_same_layers(dtype, channels, n_mel, variant):
    """Every layer's conditioner projection computed once (the accumulator starts from it) instead of the mel dots."""
    model = random_model(channels, n_mel)
    mel, audio, lengths = batch([10, 5], n_mel)
    net = fused.FusedDiffWave(model, dtype, variant)
    cond = net.projected(net.conditioner(mel, lengths // HOP))
    assert cond.shape == (4, 2, 10 * HOP, 32) and net.projected_bytes(2 * 10 * HOP) == cond.numel() * cond.itemsize
    for step in (torch.tensor([3.0, 3.0]), torch.tensor([41.25, 0.5])):
        step = step.to(DEVICE)
        within_rounding(net(audio, step, cond, lengths), model, dtype, audio, step, mel, lengths)
    with pytest.raises(ValueError, match=r"expected \(4, 2, 160, 32\)"):
        net(audio, step, cond[:, :, :-1], lengths)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the tuned variants compile for a GPU only")
@pytest.mark.parametrize("projected", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_tuned_variant_computes_the_base_models_layers(dtype, projected):
    """Each variant the tuner tries, pinned, at the base model's width (64 channels, 100 mels) over a padded second
    of audio: two variants that passed every test above at 16 channels made illegal memory accesses there (run 8)."""
    model = random_model(64, 100)
    mel, audio, lengths = batch([1500, 900], 100)
    step = torch.tensor([3.0, 41.25], device=DEVICE)
    for config in fused.TUNED:
        net = fused.FusedDiffWave(model, dtype, fused.pinned(config))
        cond = net.conditioner(mel, lengths // HOP)
        got = net(audio, step, net.projected(cond) if projected else cond, lengths)
        within_rounding(got, model, dtype, audio, step, mel, lengths)


def test_lengths_are_one_per_item_and_none_reads_past_the_batch():
    model = random_model()
    mel, audio, _ = batch([10, 10], 20)
    net = fused.FusedDiffWave(model, torch.float32, VARIANT)
    cond, step = net.conditioner(mel), torch.tensor([3.0, 3.0], device=DEVICE)
    with pytest.raises(ValueError, match=r"lengths of shape \(1,\) for a batch of 2"):
        net(audio, step, cond, torch.tensor([160], device=DEVICE))
    past = net(audio, step, cond, torch.tensor([10_000, -5], device=DEVICE))
    assert torch.equal(past, net(audio, step, cond, torch.tensor([160, 0], device=DEVICE)))


def test_a_16_bit_skip_sum_stays_within_fp16_rounding():
    """The GPU suite's measurement of a half-size skip sum runs the same layers."""
    model = random_model()
    mel, audio, lengths = batch([10, 5], 20)
    net = fused.FusedDiffWave(model, torch.float16, VARIANT, skip_dtype=torch.float16)
    step = torch.tensor([41.25, 0.5], device=DEVICE)
    within_rounding(net(audio, step, net.conditioner(mel, lengths // HOP), lengths), model, torch.float16, audio, step,
                    mel, lengths)


@pytest.mark.parametrize("config", [{"BLOCK_T": 16, "MERGED": False}, {"BLOCK_T": 32, "MERGED": True},
                                    {"BLOCK_T": 64, "MERGED": False}])
def test_every_kernel_variant_computes_the_same_layers(config):
    """Row tiles that straddle the utterance's end and the padding, of several sizes, both dot layouts."""
    model = random_model(12, 7)
    mel, audio, lengths = batch([10, 5], 7, seed=3)
    step = torch.tensor([12.0, 3.5], device=DEVICE)
    net = fused.FusedDiffWave(model, torch.float32, config)
    got = net(audio, step, net.conditioner(mel, lengths // HOP), lengths)
    within_rounding(got, model, torch.float32, audio, step, mel, lengths)


@pytest.mark.parametrize("engine", ["fused", "plain"])
def test_windows_equal_one_full_length_pass(engine, monkeypatch):
    """A budget that forces several windows (each far shorter than the utterance) changes nothing; one window with
    room to spare keeps every layer's conditioner projection, the same layers within rounding."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the same arithmetic whatever the window length
    model = random_model(layers=6, cycle=3)
    # 9 windows of 3 frames (11 with the halo): the last one's conditioner no longer fits what the windows leave of
    # the budget, and the two last hold only padding of the shorter item, which ends mid-window
    mel, audio, lengths = batch([27, 17], 20, seed=2)
    step = torch.tensor([7.5, 7.5], device=DEVICE)
    net = fused.FusedDiffWave(model, torch.float32, VARIANT) if engine == "fused" else None
    whole = WindowedDenoiser(model, mel, lengths, None, 1 << 30, net)
    assert len(whole.windows) == 1 and whole.projected == (engine == "fused")
    per_sample = 2 * bytes_per_sample(model, engine, None)
    small = WindowedDenoiser(model, mel, lengths, None, per_sample * (2 if engine == "fused" else 1) * 200, net)
    assert len(small.windows) >= 4 and not small.projected
    ref = whole(audio, step) if net is None else net(audio, step, net.conditioner(mel, lengths // HOP), lengths)
    assert relative_error(small(audio, step), ref, lengths) < 1e-5
    within_rounding(ref, model, torch.float32, audio, step, mel, lengths)
    within_rounding(whole(audio, step), model, torch.float32, audio, step, mel, lengths)


def test_a_projection_past_the_kernels_32_bit_offsets_keeps_the_mel_rows(monkeypatch):
    """Projected rows are wider than the window's bound on the kernel's offsets assumed."""
    model = random_model()
    mel, _, lengths = batch([30, 17], 20)
    net = fused.FusedDiffWave(model)
    widest = 2**31 // (2 * 30 * HOP)  # batch x samples x row below 2**31
    for row, projected in ((widest, True), (widest + 1, False)):
        monkeypatch.setattr(windowed, "projected_row", lambda channels, row=row: row)
        assert WindowedDenoiser(model, mel, lengths, None, 1 << 30, net).projected is projected


def test_budget_too_small_for_one_window_is_a_clear_error():
    model = random_model()
    mel, _, lengths = batch([300], 20)
    with pytest.raises(ConfigError, match=r"memory budget .* too small"):
        WindowedDenoiser(model, mel, lengths, None, 10_000, fused.FusedDiffWave(model))


def test_vocoder_fused_engine_matches_the_reference_engine():
    """The whole sampler (seeded noise, 3 steps, a length-grouped batch) through both engines."""
    model = random_model()
    mels = [torch.randn(20, n, generator=torch.Generator().manual_seed(n)) for n in (16, 9)]
    reference = "plain" if DEVICE.type == "cuda" else "tiled"
    outs = {engine: Vocoder(cfg(16, 20), model, batch_size=2, device=DEVICE.type, engine=engine, precision="fp32")(
                mels, ["a", "b"])
            for engine in ("fused", reference)}
    for got, want in zip(outs["fused"], outs[reference], strict=True):
        assert got.shape == want.shape
        assert float(abs(got - want).max()) < 1e-3


def test_engine_choice_is_checked():
    model = random_model()
    with pytest.raises(ConfigError, match="unknown inference engine"):
        Vocoder(cfg(16, 20), model, device=DEVICE.type, engine="turbo")
    with pytest.raises(ConfigError, match=r"inference\.cuda_graph"):
        Vocoder(cfg(16, 20), model, device=DEVICE.type, cuda_graph="sometimes")
    wide = random_model(channels=fused.MAX_CHANNELS + 8, layers=2)  # no variant's tiles fit in shared memory
    with pytest.raises(ConfigError, match=r"at most 128 residual channels; this model has 136; use engine 'auto'"):
        Vocoder(cfg(136, 20, layers=2), wide, device=DEVICE.type, engine="fused")
    assert fused.too_wide(random_model(channels=fused.MAX_CHANNELS, layers=2)) is None


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
def test_graph_replay_equals_eager_steps():
    model = random_model()
    mel, audio, lengths = batch([64, 40], 20)
    net = fused.FusedDiffWave(model, torch.bfloat16, VARIANT)
    eager = WindowedDenoiser(model, mel, lengths, torch.bfloat16, 1 << 30, net)
    graphed = GraphedDenoiser(WindowedDenoiser(model, mel, lengths, torch.bfloat16, 1 << 30, net))
    for t in (30.0, 4.5, 0.0):
        step = torch.full((2,), t, device=DEVICE)
        x = audio * (1 + t)
        assert torch.equal(graphed(x, step), eager(x, step))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host-device synchronisation exists on a GPU only")
def test_sampling_a_padded_batch_never_waits_for_the_gpu():
    """The host draws each step's noise while the GPU denoises: no step may read a device value (reading the
    lengths from the GPU at every step once cost a third of an H200's step at batch 16)."""
    model = random_model()
    mel, _, lengths = batch([64, 40], 20)
    denoise = FiniteWatch(WindowedDenoiser(model, mel, lengths, torch.float16, 1 << 30,
                                           fused.FusedDiffWave(model, torch.float16, VARIANT)))
    plan = make_plan(cfg(16, 20).model.diffwave, "fast")
    shape, host_lengths = (2, 64 * HOP), lengths.cpu()  # read before the watch: a device-to-host copy waits

    def run() -> torch.Tensor:
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        return sample(denoise, plan, shape, DEVICE, host_lengths, gens)

    first = run()  # compiles the kernel and caches the conditioner, which may wait
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(first, again) and bool(denoise.finite)


class Failing:
    """A kernel family whose launches raise `error` (as Triton's compiler does on a GPU it cannot target), for
    activations of the dtypes in `refused` (all of them by default); the others launch `runs`."""

    def __init__(self, error: Callable[[str], BaseException], refused: tuple[torch.dtype, ...] | None = None,
                 runs: object = None) -> None:
        self.error, self.refused, self.runs, self.launches = error, refused, runs, []

    def __getitem__(self, grid: object) -> object:
        def launch(*args: torch.Tensor, **meta: object) -> None:
            self.launches.append(args[0].dtype)
            if self.refused is None or args[0].dtype in self.refused:
                raise self.error("unsupported target")
            self.runs[grid](*args, **meta)
        return launch


def test_a_kernel_the_compiler_rejects_tries_the_split_dot_family_then_says_so(monkeypatch, caplog):
    model = random_model()
    mel, audio, lengths = batch([40], 20)
    net = fused.FusedDiffWave(model)
    cond, step = net.conditioner(mel), torch.full((1,), 3.0, device=DEVICE)
    families = {"tuned": Failing(ptxas), "plain": Failing(ptxas)}
    monkeypatch.setattr(fused, "KERNELS", families)
    monkeypatch.setattr(fused, "_fallen_back", set())
    with pytest.raises(fused.KernelError, match=r"failed on this GPU \(PTXASError: PTXAS error: unsupported target\)"):
        net(audio, step, cond, lengths)
    assert len(families["tuned"].launches) == len(families["plain"].launches) == 1
    assert "tuned variants failed for torch.float32" in caplog.text


def triton_error(kind: str, message: str = "unsupported target") -> BaseException:
    """What Triton raises when it cannot build a kernel for a GPU, or something else a launch may raise."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    return {"ptxas": lambda: PTXASError(message), "resources": lambda: OutOfResources(232448, 101376, "shared memory"),
            "compiler": lambda: CompilationError(None, None, message),
            "pass": lambda: RuntimeError("PassManager::run failed"), "memory": lambda: torch.cuda.OutOfMemoryError(message),
            "type": lambda: TypeError(message), "value": lambda: ValueError(message), "assert": lambda: AssertionError(message),
            "runtime": lambda: RuntimeError(message),
            "fault": lambda: RuntimeError("CUDA error: an illegal memory access was encountered")}[kind]()


def ptxas(message: str) -> BaseException:
    return triton_error("ptxas", message)


@pytest.mark.parametrize("kind, verdict", [(kind, True) for kind in ("ptxas", "resources", "compiler", "pass")] +
                         [(kind, False) for kind in ("memory", "type", "value", "assert", "runtime", "fault")])
def test_only_tritons_refusals_to_build_the_kernel_are_kernel_errors(monkeypatch, kind, verdict):
    """A KernelError sends the automatic engine to the plain forward: every ValueError, RuntimeError or AssertionError
    once did, so a mistake of ours (or a lost CUDA context) silently changed the engine. Running out of memory, a
    fault or our own mistake propagates unchanged, and no family is marked as fallen back."""
    model = random_model()
    mel, audio, lengths = batch([40], 20)
    net = fused.FusedDiffWave(model)
    cond, step = net.conditioner(mel), torch.full((1,), 3.0, device=DEVICE)
    error = functools.partial(triton_error, kind)
    monkeypatch.setattr(fused, "KERNELS", {"tuned": Failing(error), "plain": Failing(error)})
    monkeypatch.setattr(fused, "_fallen_back", set())
    with pytest.raises(fused.KernelError if verdict else Exception) as raised:
        net(audio, step, cond, lengths)
    if not verdict:
        assert not isinstance(raised.value, fused.KernelError)
        assert type(raised.value) is type(triton_error(kind))
    assert fused.family(torch.float32, False) == ("plain" if verdict else "tuned")


def test_a_precision_the_compiler_rejects_falls_back_alone(monkeypatch):
    """A GPU that compiles no bf16 dot (before Ampere) runs bf16 on the split-dot variants and fp16 still tuned:
    one process-wide switch once sent every later fp16 batch to the slow variants."""
    model = random_model()
    mel, audio, lengths = batch([5], 20)  # three forwards: which launches ran is checked, not the length
    real = fused.KERNELS["plain"]
    families = {"tuned": Failing(ptxas, (torch.bfloat16,), real), "plain": Failing(ptxas, (), real)}
    monkeypatch.setattr(fused, "KERNELS", families)
    monkeypatch.setattr(fused, "_fallen_back", set())
    step = torch.full((1,), 3.0, device=DEVICE)
    for dtype in (torch.bfloat16, torch.float16, torch.bfloat16):
        net = fused.FusedDiffWave(model, dtype)
        assert torch.isfinite(net(audio, step, net.conditioner(mel), lengths)).all()
    layers = len(model.residual_layers)
    assert families["tuned"].launches == [torch.bfloat16] + [torch.float16] * layers  # bf16 tried once
    assert families["plain"].launches == [torch.bfloat16] * 2 * layers
    assert (fused.family(torch.bfloat16, False), fused.family(torch.float16, False)) == ("plain", "tuned")
    assert fused.family(torch.bfloat16, True) == "tuned"  # the projected kernel is compiled apart: tried on its own


def test_triton_before_3_counts_as_absent(tmp_path):
    """torch 2.1-2.3 install Triton 2.x, whose Config takes no register cap: importing the kernel module crashed
    stages 2 and 3 there. Such a Triton is ignored and the plain forward runs."""
    stub = tmp_path / "triton"
    (stub / "language").mkdir(parents=True)
    (stub / "__init__.py").write_text("__version__ = '2.3.1'\n")
    (stub / "language" / "__init__.py").write_text("")
    probe = ("from models.vocoders.diffusion import fused; import torch\n"
             "print(fused.triton, fused.available(torch.device('cuda')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["None", "False"], out.stderr[-2000:]
    assert [fused.triton_major(v) for v in ("3.6.0", "2.3.1", "3.0.0+git1a2b", "dev")] == [3, 2, 3, 0]


@pytest.mark.skipif(fused.triton is None or DEVICE.type == "cuda", reason="needs Triton's NVIDIA backend; a GPU runs the kernel")
def test_the_first_tuned_variants_compile_for_hopper_without_spilling_and_three_programs_fit():
    """Compiled for sm_90 here, without a GPU (the interpreter compiles nothing: a process without it), for mel rows
    and projected conditioners. The kernel before its in-place accumulators took 255 registers a thread and spilled
    160 bytes: two programs an SM."""
    probe = ("from benchmarks.kernel_resources import resources\nfrom models.vocoders.diffusion import fused\n"
             "for config in fused.TUNED[:2]: print(resources(config, 'bf16'))\n"
             "print(resources(fused.TUNED[0], 'fp16', projected=True))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("Resources(")]
    assert len(rows) == 3 and all("stack=0," in row and "mma='HGMMA'" in row for row in rows), out.stdout
    assert any("programs=3" in row or "programs=4" in row for row in rows), out.stdout


def test_windows_take_a_compiled_forward():
    """A compiled module proxies len() to DiffWave, so `bool(compiled)` raises: the H200 suite's compiled plain case
    failed on it."""
    model = random_model()
    compiled = torch.compile(model, dynamic=False)  # compiles lazily: nothing runs here
    mel, _, lengths = batch([30, 17], 20)
    assert WindowedDenoiser(model, mel, lengths, None, 1 << 30, None, compiled).forward is compiled
