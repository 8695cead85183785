"""What rounding the activations and the skip sum to 16 bits costs the network's output, on the CPU.

    python -m benchmarks.rounding [--seconds 0.4]

One forward of the base config's DiffWave (random weights, the output layer made non-zero) in
float64, then again with each layer's output, conditioner and (optionally) the running skip sum
rounded to bf16 or fp16 after every layer, as a kernel that stores them so would; prints the
relative error of each against float64. A design aid for the fused kernel's storage formats.
"""

from __future__ import annotations

import argparse
import math

import torch

from models.vocoders.diffusion.diffwave.diffwave import build_diffwave
from utils.config import REPO_ROOT, load_config

CASES = [("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp32"), ("fp16", "fp16")]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def rounded(t: torch.Tensor, name: str | None) -> torch.Tensor:
    return t if name is None else t.to(DTYPES[name]).double()


@torch.no_grad()
def forward(model: torch.nn.Module, audio: torch.Tensor, mel: torch.Tensor, step: torch.Tensor,
            activations: str | None, skips: str | None) -> torch.Tensor:
    """DiffWave.forward, storing what a fused kernel stores between layers in the given formats."""
    projected = model.project_conditioner(model.spectrogram_upsampler(mel))
    x = rounded(torch.relu(model.input_projection(audio.unsqueeze(1))), activations)
    embedding = model.diffusion_embedding(step)
    skip = torch.zeros_like(x)
    for layer, layer_projected in zip(model.residual_layers, projected, strict=True):
        x, layer_skip = layer(x, embedding, rounded(layer_projected, activations))
        x, skip = rounded(x, activations), rounded(skip + layer_skip, skips)
    x = torch.relu(model.skip_projection(skip / math.sqrt(len(model.residual_layers))))
    return model.output_projection(x).squeeze(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rounding", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "egs/vocoder/diffusion/diffwave/exp_config.json"))
    parser.add_argument("--seconds", type=float, default=0.4)
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    torch.manual_seed(0)
    model = build_diffwave(cfg).double().eval()
    torch.nn.init.normal_(model.output_projection.weight, std=0.1)  # zero at initialisation: make the output matter
    hop = model.hop_size
    frames = max(1, int(args.seconds * int(cfg.preprocess.sample_rate)) // hop)
    audio = torch.randn(1, frames * hop, dtype=torch.float64)
    mel = torch.randn(1, int(cfg.preprocess.n_mel), frames, dtype=torch.float64) - 4
    step = torch.tensor([20])
    reference = forward(model, audio, mel, step, None, None)
    for activations, skips in CASES:
        error = forward(model, audio, mel, step, activations, skips) - reference
        print(f"activations {activations}, skip sum {skips}: relative error {float(error.norm() / reference.norm()):.2e}, "
              f"max {float(error.abs().max() / reference.abs().max()):.2e}")


if __name__ == "__main__":
    main()
