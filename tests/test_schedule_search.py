"""Schedule search: valid monotone schedules, never worse than the configured one, read back by stage 3."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.vocoders.diffusion.diffusion_vocoder_inference import vocoder_from_experiment
from models.vocoders.diffusion.experiment import SCHEDULE_FILE, Experiment
from models.vocoders.diffusion.schedule_search import coarse_grid, is_valid, search_schedule
from processors.preprocess import preprocess
from tests.tiny_experiment import REPO, make_experiment
from utils.config import ConfigError
from utils.synthetic import write_corpus


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A tiny random model with a processed corpus (two validation utterances) to score on."""
    root = tmp_path_factory.mktemp("search")
    expt, cfg = make_experiment(root)
    write_corpus(root / "corpus", speakers=1, per_speaker=40, sample_rate=8000, seconds=(0.3, 0.5))
    preprocess(cfg, num_workers=1)
    return expt, cfg


def test_coarse_grid_is_monotone_and_holds_the_configured_schedule():
    default = [0.0001, 0.001, 0.01, 0.05, 0.2, 0.5]
    grid = coarse_grid(6, default)
    assert grid[0] == default and len(grid) > 30
    assert all(len(b) == 6 and is_valid(b) for b in grid)
    assert len({tuple(b) for b in coarse_grid(2)}) == len(coarse_grid(2))  # the power is moot at 2 steps: no repeats
    assert not is_valid([0.1, 0.05]) and not is_valid([0.1, 1.0])


def test_search_finds_a_schedule_no_worse_than_the_default_and_stage3_uses_it(experiment):
    expt, cfg = experiment
    model = Experiment(expt).load_model(Experiment(expt).config())
    result = search_schedule(cfg, model, steps=6, utterances=2, seconds=0.3, rounds=1)
    assert len(result["utterances"]) == 2 and len(result["betas"]) == 6 and is_valid(result["betas"])
    assert result["scores"]["score"] <= result["reference"]["fast"]["score"] + 1e-9
    assert result["scores"]["score"] == pytest.approx(result["scores"]["mel_l1"] + result["scores"]["mstft"])
    assert result["reference"]["full"]["steps"] == 50 and result["check"]["seed"] == 1235
    Experiment(expt).save_schedule(result)
    vocoder = vocoder_from_experiment(expt, device="cpu", sampler="searched")
    assert vocoder.plan.betas.tolist() == pytest.approx(result["betas"])
    with pytest.raises(ConfigError, match="no 3-step schedule; searched: 6"):
        Experiment(expt).searched_betas(3)


def test_search_cli_writes_per_step_schedules_and_stage3_reads_them(experiment, tmp_path):
    expt, _ = experiment
    Experiment(expt).save_schedule({"steps": 3, "betas": [0.001, 0.1, 0.5]})  # an earlier search for another step count
    env = {"PYTHONPATH": str(REPO), "PATH": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "bins/vocoder/search_schedule.py", "--expt_dir", str(expt), "--steps", "2",
                             "--utterances", "1", "--seconds", "0.2", "--rounds", "1"],
                            cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "searched       2" in result.stdout and "full          50" in result.stdout
    data = json.loads((expt / SCHEDULE_FILE).read_text())
    assert data["default"] == "2" and "betas" in data["schedules"]["2"]
    assert Experiment(expt).searched_betas() == data["schedules"]["2"]["betas"]  # the latest search is the default
    assert Experiment(expt).searched_betas(3) == [0.001, 0.1, 0.5]  # kept beside the new one
    vocoder = vocoder_from_experiment(expt, device="cpu", sampler="searched", steps=2)
    assert vocoder.plan.steps == 2


def test_utterances_no_score_is_defined_on_are_left_out_and_none_at_all_is_one_line(experiment, caplog):
    """Under the M-STFT's 1025 samples (--seconds 0.1 at 8 kHz) every score was NaN, so every candidate ranked
    alike and the grid's first was saved as the searched schedule (worse than the fast one on mel L1 alone)."""
    import logging

    import numpy as np

    from models.vocoders.diffusion.schedule_search import scorable, validation_utterances

    expt, cfg = experiment
    model = Experiment(expt).load_model(Experiment(expt).config())
    with pytest.raises(ConfigError, match=r"none of the 2 validation utterances can score a schedule: each needs 1025 "
                                          r"samples \(0\.128 s\) of sound; raise --seconds \(0\.1\)"):
        search_schedule(cfg, model, steps=2, utterances=2, seconds=0.1, rounds=1)
    (name, mel, audio), other = validation_utterances(cfg, 2, 0.3)
    with caplog.at_level(logging.WARNING):
        assert scorable([(name, mel, np.zeros_like(audio)), other], 0.3, 8000) == [other]
    assert f"left out of the schedule search, silent or shorter than 1025 samples (0.128 s) of sound: {name}" in caplog.text


def test_missing_schedule_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"searched_schedule\.json: missing; run bins/vocoder/search_schedule\.py"):
        Experiment(tmp_path).searched_betas()



def project_imports(path: Path) -> set[str]:
    """Project modules a file imports anywhere in it, function-level imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
            names = [n if (REPO / (n.replace(".", "/") + ".py")).is_file() else node.module for n in names]
        found.update(n for n in names if (REPO / (n.replace(".", "/") + ".py")).is_file())
    return found


def test_no_import_loops():
    """Schedules are read by the experiment, so stage 3 no longer imports the search that imports it."""
    files = [p for top in ("models", "processors", "utils", "evaluation") for p in (REPO / top).rglob("*.py")]
    graph = {".".join(p.relative_to(REPO).with_suffix("").parts): project_imports(p) for p in files}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)):
                return True
        return False

    assert [m for m in graph if reaches(m, m, set())] == []


def test_the_scorer_keeps_fp32_once_an_automatic_half_precision_overflowed(experiment, monkeypatch, caplog):
    """Each schedule gets its own Vocoder: an overflow found once is not paid (and warned of) again per candidate."""
    import logging

    import torch

    from models.vocoders.diffusion import diffusion_vocoder_inference as inference
    from models.vocoders.diffusion.schedule_search import ScheduleScorer, validation_utterances

    expt, cfg = experiment
    model = Experiment(expt).load_model(Experiment(expt).config())
    forward = type(model).forward
    monkeypatch.setattr(inference, "inference_precision", lambda setting, device: "bf16" if setting == "auto" else setting)
    monkeypatch.setattr(type(model), "forward", lambda self, *args: forward(self, *args) * (
        float("inf") if torch.is_autocast_enabled("cpu") else 1.0))
    scorer = ScheduleScorer(cfg, model, validation_utterances(cfg, 2, 0.3), device="cpu")
    with caplog.at_level(logging.WARNING):
        first, second = scorer("fast"), scorer("searched", [0.001, 0.01, 0.5])
    assert scorer.precision == "fp32" and caplog.text.count("overflowed") == 1
    assert all(value == value for value in [*first.values(), *second.values()])  # no NaN scores
