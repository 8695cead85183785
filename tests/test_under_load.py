"""Issue 13, under load: CPU training takes only the cores other jobs leave free, and follows the load.

The load average is simulated (monkeypatched): timings on a shared machine would prove nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.recipe_helpers import tiny_training_config
from tests.training_kit import trainer
from utils.synthetic import write_corpus
from utils.threads import fair_threads


@pytest.fixture
def machine(monkeypatch):
    """A fake 8-core machine whose load average the test sets."""
    state = {"load": 0.0}
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))
    monkeypatch.setattr(os, "getloadavg", lambda: (state["load"], state["load"], state["load"]))
    threads = torch.get_num_threads()
    yield state
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("load", "own", "ceiling", "expected"), [
    (0.0, 0, 8, 8),    # a quiet machine: every core
    (1.0, 0, 8, 7),    # one busy neighbour: leave it its core
    (7.6, 0, 8, 1),    # a crowded machine: one thread, never zero
    (40.0, 0, 8, 1),
    (8.0, 8, 8, 8),    # the load is our own eight threads: keep them
    (9.0, 8, 8, 7),    # ... plus one neighbour
    (0.0, 0, 3, 3),    # never above the ceiling (OMP_NUM_THREADS or train.num_threads)
])
def test_fair_threads_leaves_the_neighbours_their_cores(machine, load, own, ceiling, expected):
    machine["load"] = load
    assert fair_threads(ceiling, own_busy=own) == expected


def config(tmp_path: Path, **train: object) -> Path:
    write_corpus(tmp_path / "corpus", 1, 4, sample_rate=8000)
    path = tiny_training_config(tmp_path, "config.json", **train)
    from processors.preprocess import preprocess
    from utils.config import load_config

    preprocess(load_config(path), num_workers=1)
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU thread policy")
def test_cpu_training_shrinks_and_regrows_its_threads_with_the_load(tmp_path, machine, monkeypatch, caplog):
    import models.vocoders.diffusion.device_policy as module

    torch.set_num_threads(4)  # the ceiling, as OMP_NUM_THREADS would set it
    machine["load"] = 6.0  # six other busy processes on eight cores
    caplog.set_level("INFO")
    run = trainer(config(tmp_path, max_steps=4), "loaded")
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(module, "THREAD_CHECK_STEPS", 2)
    machine["load"] = 2.0  # the neighbours left; the load is our own two threads
    run.train()
    assert torch.get_num_threads() == 4 and "torch threads 2 -> 4" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU thread policy")
def test_a_fixed_num_threads_is_kept_whatever_the_load(tmp_path, machine):
    machine["load"] = 50.0
    run = trainer(config(tmp_path, max_steps=1, num_threads=3), "fixed")
    assert torch.get_num_threads() == 3 and not run.threads.adaptive
