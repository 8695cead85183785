"""Ship a trained vocoder without the training code: TorchScript or ONNX.

- TorchScript: the whole synthesis (mel -> waveform) with the chosen sampler baked in. The
  Gaussian noise is an input, `(draws, batch, frames * hop)`, so runs are reproducible and
  comparable; `seeded_noise` draws exactly what `ddpm.sample` draws for one seeded utterance.
- ONNX: the denoising network alone (dynamic batch and length) with the sampler plan in the
  model's metadata; `OnnxVocoder` walks `ddpm.sample` with onnxruntime as the denoiser.

The TorchScript sampler restates `ddpm.sample`'s update in scriptable form (TorchScript cannot
call Python closures); tests hold the two to the same waveform.
"""

import copy
import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.vocoders.diffusion.ddpm import SamplerPlan, sample
from models.vocoders.diffusion.diffusion_vocoder_inference import Vocoder, utterance_seed
from utils.io import atomic_write, atomic_write_bytes

FORMATS = ("torchscript", "onnx")
EXAMPLE_FRAMES = 16


def noise_draws(plan: SamplerPlan) -> int:
    """Gaussian draws one synthesis uses: the start, plus one per step that adds noise."""
    return 1 + sum(step.sigma > 0 for step in plan.walk())


def seeded_noise(seed: int, draws: int, length: int) -> Tensor:
    """`(draws, 1, length)`: the noise `ddpm.sample` draws for one utterance from `Generator(seed)`."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randn(length, generator=gen) for _ in range(draws)]).unsqueeze(1)


def _example(model: nn.Module, n_mel: int, batch: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    hop = int(model.hop_size)
    return torch.zeros(batch, EXAMPLE_FRAMES * hop), torch.full((batch,), 1.5), torch.zeros(batch, n_mel, EXAMPLE_FRAMES)


class ScriptedSynthesis(nn.Module):
    """Mel `(batch, n_mel, frames)` and noise `(draws, batch, frames * hop)` to waveform `(batch, frames * hop)`."""

    hop: int
    n_mel: int
    sample_rate: int
    draws: int
    positions: list[float]
    x_scales: list[float]
    eps_scales: list[float]
    sigmas: list[float]

    def __init__(self, denoiser: nn.Module, plan: SamplerPlan, hop: int, n_mel: int, sample_rate: int) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.hop, self.n_mel, self.sample_rate, self.draws = hop, n_mel, sample_rate, noise_draws(plan)
        walk = plan.walk()  # the table ddpm.sample runs on
        self.positions, self.x_scales = [s.position for s in walk], [s.x_scale for s in walk]
        self.eps_scales, self.sigmas = [s.eps_scale for s in walk], [s.sigma for s in walk]

    def forward(self, mel: Tensor, noise: Tensor) -> Tensor:
        batch, length = mel.size(0), mel.size(2) * self.hop
        if noise.dim() != 3 or noise.size(0) != self.draws or noise.size(1) != batch or noise.size(2) != length:
            raise RuntimeError("noise must have shape (draws, batch, frames * hop); see the module's draws and hop")
        x = noise[0]
        drawn = 1
        for i in range(len(self.positions)):
            step = torch.full([batch], self.positions[i], dtype=torch.float32, device=mel.device)
            x = self.x_scales[i] * x + self.eps_scales[i] * self.denoiser(x, step, mel)
            if self.sigmas[i] > 0:
                x = x + self.sigmas[i] * noise[drawn]
                drawn += 1
            x = x.clamp(-1.0, 1.0)
        return x


def export_torchscript(vocoder: Vocoder, path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Trace the network (shapes stay dynamic), script the sampler around it, save atomically."""
    model = copy.deepcopy(vocoder.model).float().cpu().eval()
    pre = vocoder.cfg.preprocess
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notes; the tests check every length
        denoiser = torch.jit.trace(model, _example(model, int(pre.n_mel)), check_trace=False)
        scripted = torch.jit.script(ScriptedSynthesis(denoiser, vocoder.plan, int(pre.hop_size), int(pre.n_mel),
                                                      int(pre.sample_rate)))
        atomic_write(path, lambda handle: torch.jit.save(scripted, handle))
    return scripted


def _plan_metadata(vocoder: Vocoder) -> dict[str, str]:
    pre, plan = vocoder.cfg.preprocess, vocoder.plan
    return {
        "diffvoc.sampler": json.dumps({"kind": plan.kind, "positions": plan.positions.tolist(), "betas": plan.betas.tolist()}),
        "diffvoc.sample_rate": str(int(pre.sample_rate)),
        "diffvoc.hop_size": str(int(pre.hop_size)),
        "diffvoc.n_mel": str(int(pre.n_mel)),
    }


def export_onnx(vocoder: Vocoder, path: str | os.PathLike) -> None:
    """The denoiser `eps = f(audio (B, T), step (B,), mel (B, n_mel, T / hop))` with the plan as metadata."""
    import onnx

    model = copy.deepcopy(vocoder.model).float().cpu().eval()
    hop = int(model.hop_size)
    frames, batch = torch.export.Dim("frames", min=1, max=2**20), torch.export.Dim("batch", min=1, max=1024)
    shapes = {"audio": {0: batch, 1: frames * hop}, "diffusion_step": {0: batch}, "spectrogram": {0: batch, 2: frames}}
    tmp = Path(path).with_name(f".{Path(path).name}.export.tmp")
    quiet = {name: logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")}
    levels = {name: logger.level for name, logger in quiet.items()}
    try:
        for logger in quiet.values():  # the exporter logs every graph pass at INFO
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, _example(model, int(vocoder.cfg.preprocess.n_mel), batch=2), str(tmp), dynamo=True,
                              input_names=["audio", "step", "mel"], output_names=["eps"], dynamic_shapes=shapes,
                              external_data=False, verbose=False)
        proto = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
        for name, logger in quiet.items():
            logger.setLevel(levels[name])
    onnx.helper.set_model_props(proto, _plan_metadata(vocoder))
    atomic_write_bytes(path, proto.SerializeToString())


class OnnxVocoder:
    """An exported ONNX denoiser driven by the same sampler code as PyTorch synthesis."""

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None) -> None:
        """`threads` defaults to torch's count, so both share the cores the same way (run.sh sets it)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("onnxruntime is not installed: pip install '.[export]'") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
        meta = self.session.get_modelmeta().custom_metadata_map
        if "diffvoc.sampler" not in meta:
            raise ValueError(f"{path}: no sampler metadata; export it with bins/vocoder/export.py")
        plan = json.loads(meta["diffvoc.sampler"])
        self.plan = SamplerPlan(plan["kind"], torch.tensor(plan["positions"], dtype=torch.float32),
                                torch.tensor(plan["betas"], dtype=torch.float64))
        self.sample_rate, self.hop, self.n_mel = (int(meta[f"diffvoc.{k}"]) for k in ("sample_rate", "hop_size", "n_mel"))

    def __call__(self, mel: np.ndarray | Tensor, seeds: Sequence[int]) -> np.ndarray:
        """Mels `(batch, n_mel, frames)` (one generator seed per item) to `(batch, frames * hop)`."""
        mel = np.ascontiguousarray(np.asarray(mel, dtype=np.float32))
        if mel.ndim != 3 or mel.shape[1] != self.n_mel or len(seeds) != mel.shape[0]:
            raise ValueError(f"mel must be (batch, {self.n_mel}, frames) with one seed per item, got {mel.shape}")

        def denoise(x: Tensor, step: Tensor) -> Tensor:
            feeds = {"audio": x.numpy(), "step": step.float().numpy(), "mel": mel}
            return torch.from_numpy(self.session.run(None, feeds)[0])

        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        return sample(denoise, self.plan, (mel.shape[0], mel.shape[2] * self.hop), "cpu", None, generators).numpy()


def compare(vocoder: Vocoder, path: str | os.PathLike, fmt: str, mel: Tensor, repeats: int = 3) -> dict[str, Any]:
    """The exported model against PyTorch on one mel: max abs difference and best-of-`repeats` times."""
    name = "export-check"
    seed = utterance_seed(vocoder.seed, name)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path))
        noise = seeded_noise(seed, int(module.draws), mel.shape[-1] * int(module.hop))

        def run() -> np.ndarray:
            with torch.no_grad():
                return module(mel[None], noise)[0].numpy()
    else:
        runner = OnnxVocoder(path)

        def run() -> np.ndarray:
            return runner(mel[None].numpy(), [seed])[0]

    def best(fn: Any) -> tuple[float, Any]:
        times, out = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return min(times), out

    torch_s, reference = best(lambda: vocoder.batch([mel], [name])[0])
    export_s, exported = best(run)
    return {"max_abs_diff": float(np.abs(reference - exported).max()), "pytorch_s": torch_s, "exported_s": export_s,
            "audio_s": mel.shape[-1] * vocoder.hop / int(vocoder.cfg.preprocess.sample_rate)}
