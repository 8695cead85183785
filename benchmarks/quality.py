"""Quality per GPU-minute: the base recipe trained for a fixed wall-time budget, then scored against Griffin-Lim.

    python -m benchmarks.quality --corpus SPEECH --minutes 8 --out fast.json            # bf16 + torch.compile
    python -m benchmarks.quality --corpus SPEECH --minutes 8 --plain --out plain.json   # fp32, eager
    python -m benchmarks.quality --corpus SPEECH --minutes 3 --both                     # both, one stage 1
    python -m benchmarks.quality --extrapolate gpu_results.json     # GPU-hours to the published budget, per case

SPEECH is any folder of recordings (the folder dataset: `<speaker>/<name>.wav`, or flat);
`bash benchmarks/speech_corpus.sh DIR` writes one with espeak-ng (Debian's package). Stages 1-4
run through run.sh as a user runs them: features, `train.max_minutes` of training with the base
model (batch 16), the test split vocoded with the fast schedule, and stage 4 against Griffin-Lim
on the same mels. The script prints the steps trained and stage 4's table, and writes both as JSON.
Each rate is also put as the GPU-hours it needs to show the network as much audio as DiffWave's
published training did.
`--both` trains the two variants one after the other on the same features (about 2 x (minutes
+ 1.5) minutes on a GPU), for a lease that allows one command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from evaluation.evaluate import summary_table
from utils.config import REPO_ROOT, load_config
from utils.config_schema import COMPILE_MODES

RUN_SH = REPO_ROOT / "egs/vocoder/diffusion/diffwave/run.sh"
# DiffWave's published models (Kong et al., ICLR 2021): 1M steps of batch 16, clips of 16,000 samples.
PAPER_SAMPLES = 1_000_000 * 16 * 16_000


def hours_to_paper(samples_per_s: float) -> float:
    """GPU-hours to train on as many audio samples as the published models did, at this rate. (Samples, not
    seconds: the paper's LJSpeech is 22.05 kHz, this recipe 24 kHz, and the network costs the same per sample.)"""
    return PAPER_SAMPLES / samples_per_s / 3600


def extrapolate(results: Path, sample_rate: int) -> None:
    """Every training case of a GPU suite's JSON as GPU-hours to the published budget."""
    try:
        cases = [c for c in json.loads(results.read_text(encoding="utf-8"))["cases"] if "audio_s_per_s" in c]
    except (OSError, ValueError, KeyError) as error:
        sys.exit(f"{results}: not a GPU suite's results ({type(error).__name__}: {error})")
    if not cases:
        sys.exit(f"{results}: no training case with audio_s_per_s")
    for case in cases:
        rate = case["audio_s_per_s"] * sample_rate
        print(f"{case['case']:50s} {case['audio_s_per_s']:7.1f} audio-s/s  {hours_to_paper(rate):6.1f} GPU-hours")


def recipe_config(work: Path, corpus: Path, minutes: float, plain: bool, batch_size: int,
                  compile_mode: str | None = None) -> Path:
    """The base recipe on the corpus, bounded by wall time only, checkpoints and evaluation at the end;
    `compile_mode` (the fast variant's) None keeps the recipe's."""
    cfg = {
        "base_config": str(REPO_ROOT / "egs/vocoder/diffusion/diffwave/exp_config.json"),
        "dataset": ["speech"], "use_custom_dataset": ["speech"], "dataset_path": {"speech": str(corpus)},
        "log_dir": str(work / "ckpts"), "preprocess": {"processed_dir": str(work / "data")},
        "train": {"batch_size": batch_size, "max_steps": 0, "max_epoch": -1, "max_minutes": minutes,
                  "save_checkpoint_stride": [0], "keep_last": [1], "run_eval": [False],
                  "mixed_precision": "no" if plain else "bf16", "compile": not plain, "adamw": {"fused": not plain}},
    }
    if compile_mode and not plain:
        cfg["train"]["compile_mode"] = compile_mode
    path = work / f"{'plain' if plain else 'fast'}.json"
    path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return path


def crop_samples(config: Path) -> int:
    pre = load_config(config).preprocess
    return int(pre.cut_mel_frame) * int(pre.hop_size)


def stage(*args: str) -> float:
    """One run.sh stage; its wall time."""
    start = time.perf_counter()
    subprocess.run(["sh", str(RUN_SH), *args], check=True)
    return time.perf_counter() - start


def train_and_score(work: Path, config: Path, name: str) -> dict:
    """Stages 2-4 for one variant on the features stage 1 wrote; their wall times, last checkpoint and stage 4."""
    expt = work / "ckpts" / name
    seconds = {
        "stage2": stage("--stage", "2", "--config", str(config), "--name", name),
        "stage3": stage("--stage", "3", "--infer_mode", "infer_from_dataset", "--infer_datasets", "speech",
                        "--infer_expt_dir", str(expt)),
        "stage4": stage("--stage", "4", "--infer_expt_dir", str(expt), "--baseline", "griffinlim"),
    }
    records = json.loads((expt / "checkpoint" / "ckpts.json").read_text(encoding="utf-8"))["checkpoints"]
    summary = expt / "result" / "eval" / "summary.json"
    return {"seconds": seconds, "last_checkpoint": records[-1], "summary": json.loads(summary.read_text(encoding="utf-8")),
            "summary_path": str(summary)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="a folder of speech recordings")
    parser.add_argument("--minutes", type=float, default=8.0, help="training wall time (of each variant)")
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--plain", action="store_true", help="fp32 and eager: the run without the speed-ups")
    variant.add_argument("--both", action="store_true", help="the speed-ups, then the plain run, on one stage 1")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--compile_mode", choices=COMPILE_MODES, default=None,
                        help="the fast variant's train.compile_mode (default: the recipe's)")
    parser.add_argument("--work", default=None, help="keep everything here (default: a temporary folder)")
    parser.add_argument("--out", default="quality.json")
    parser.add_argument("--extrapolate", type=Path, default=None, metavar="SUITE_JSON",
                        help="only print a GPU suite's training cases as GPU-hours to the published budget")
    parser.add_argument("--sample_rate", type=int, default=24000, help="with --extrapolate: the suite config's rate")
    args = parser.parse_args(argv)
    if args.extrapolate:
        extrapolate(args.extrapolate, args.sample_rate)
        return
    if not args.corpus:
        parser.error("--corpus is required (or --extrapolate)")
    if args.plain and args.compile_mode:
        parser.error("--compile_mode sets the fast variant's mode; --plain trains without compiling")

    plains = [False, True] if args.both else [args.plain]
    with tempfile.TemporaryDirectory(prefix="quality_") as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        corpus = Path(args.corpus).resolve()
        configs = {("plain" if plain else "fast"): recipe_config(work, corpus, args.minutes, plain, args.batch_size,
                                                                           args.compile_mode)
                   for plain in plains}
        stage1 = stage("--stage", "1", "--config", str(next(iter(configs.values()))))
        results, failed = {"minutes": args.minutes, "batch_size": args.batch_size, "stage1_s": stage1}, []
        mode = args.compile_mode or "the recipe's mode"
        for name, config in configs.items():
            try:
                result = results[name] = train_and_score(work, config, name)
                steps = int(result["last_checkpoint"]["step"])
                result["hours_to_paper"] = hours_to_paper(steps * args.batch_size * crop_samples(config) / (60 * args.minutes))
            except Exception as error:  # one failing variant must not cost a lease the other
                results[name] = {"error": f"{type(error).__name__}: {error}"}
                failed.append(name)
                print(f"{name}: FAILED: {results[name]['error']}", file=sys.stderr, flush=True)
                continue
            finally:
                Path(args.out).write_text(json.dumps(results, indent=1), encoding="utf-8")
            print(f"{name}: trained {args.minutes:g} min ({'fp32 eager' if name == 'plain' else f'bf16 compiled, {mode}'}, "
                  f"batch {args.batch_size}), {steps} steps; last checkpoint {result['last_checkpoint']}; at this rate "
                  f"the published models' training budget takes {result['hours_to_paper']:.1f} GPU-hours")
            print(summary_table(result["summary_path"]))
        print(f"figures in {args.out}", file=sys.stderr)
        if failed:
            sys.exit(f"failed: {', '.join(failed)} (see above)")


if __name__ == "__main__":
    main()
