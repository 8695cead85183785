"""Search an N-step noise schedule for a trained experiment; stage 3 uses it with --infer_sampler searched."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, as run.sh sets PYTHONPATH: `python bins/...` works

from models.vocoders.diffusion.experiment import Experiment, with_recipe_config
from models.vocoders.diffusion.schedule_search import search_schedule
from utils.cli import add_common_args, positive_int, run, seconds
from utils.text import plural


def main(args: argparse.Namespace) -> None:
    experiment = Experiment(args.expt_dir)
    cfg = with_recipe_config(experiment.config(), args.config)  # as stage 3: a --config adds its inference section
    model = experiment.load_model(cfg, args.checkpoint, not args.raw_weights)
    result = search_schedule(cfg, model, args.steps, args.utterances, args.seconds, args.rounds, args.seed, args.device)
    path = experiment.save_schedule(result)
    rows = [("searched", result["scores"], result["check"]["searched"])]
    rows += [(name, result["reference"][name], result["check"][name]) for name in ("fast", "full")]
    print(f"{plural(len(result['utterances']), 'utterance')} of <= {args.seconds:g} s, "
          f"{plural(result['evaluations'], 'schedule')} scored; "
          f"score = mel_l1 + mstft (seed {args.seed}; check: seed {result['check']['seed']})")
    print(f"{'schedule':<10} {'steps':>5} {'mel_l1':>8} {'mstft':>8} {'score':>8} {'check':>8}")
    for name, s, c in rows:
        print(f"{name:<10} {s['steps']:>5} {s['mel_l1']:>8.4f} {s['mstft']:>8.4f} {s['score']:>8.4f} {c['score']:>8.4f}")
    print("searched betas: " + ", ".join(f"{b:.4g}" for b in result["betas"]))
    print(f"written to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser, config_required=False)
    parser.add_argument("--expt_dir", required=True, help="experiment folder written by stage 2")
    parser.add_argument("--steps", type=int, required=True, help="number of sampling steps of the schedule")
    parser.add_argument("--utterances", type=positive_int, default=4, help="validation utterances to score on")
    parser.add_argument("--seconds", type=seconds, default=1.0, help="at most this much of each utterance")
    parser.add_argument("--rounds", type=int, default=3, help="refinement rounds after the coarse grid")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: the newest)")
    parser.add_argument("--raw_weights", action="store_true", help="use the raw weights even when EMA weights exist")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    run(main, parser)
