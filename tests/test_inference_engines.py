"""Stage 3's engine options at their edges: compiled lengths, memory budgets, CUDA graphs, kernel errors, samplers.

CUDA-only choices are tested on the CPU with what torch.cuda reports faked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from models.vocoders.diffusion.diffusion_vocoder_inference import Vocoder
from models.vocoders.diffusion.diffwave.diffwave import build_diffwave
from tests.test_inference import tiny_cfg


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_diffwave(tiny_cfg()).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return net


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
