"""Stage 3: vocode a dataset's test split, a folder of mels, or a folder of audio.

Options carry run.sh's names (`--infer_sampler`, ...), so messages name the flag the user
typed; the short names (`--sampler`, ...) still work.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, as run.sh sets PYTHONPATH: `python bins/...` works

from models.vocoders.diffusion.ddpm import FIXED_STEPS, SAMPLER_NAMES, training_betas
from models.vocoders.diffusion.diffusion_vocoder_inference import PRECISIONS, vocoder_from_experiment
from models.vocoders.diffusion.experiment import Experiment, locate_experiment, with_recipe_config
from models.vocoders.diffusion.inference_modes import MODES, run_inference
from processors.mel_conventions import mel_converter
from utils.cli import add_common_args, run
from utils.config import ConfigError
from utils.config_schema import validate


def main(args: argparse.Namespace) -> None:
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--infer_batch_size {args.batch_size}: must be at least 1")
    expt_dir, checkpoint = locate_experiment(args.infer_expt_dir, args.checkpoint)
    experiment = Experiment(expt_dir)
    cfg = with_recipe_config(experiment.config(), args.config)
    validate(cfg, "inference")
    sampler = args.sampler or cfg.get("inference", {}).get("sampler") or "fast"
    if args.steps is not None and sampler in FIXED_STEPS:
        raise ConfigError(f"--infer_steps {args.steps} does not apply to the {sampler} sampler ({FIXED_STEPS[sampler]}); "
                          "use --infer_sampler ddim for N steps, or searched for a searched N-step schedule")
    trained_steps = len(training_betas(cfg.model.diffwave))
    if args.steps is not None and sampler == "ddim" and not 1 <= args.steps <= trained_steps:
        raise ConfigError(f"--infer_steps {args.steps}: ddim takes 1 to {trained_steps} steps (the model's training steps)")
    options = {"seed": args.seed, "device": args.device}
    if args.precision:
        options["precision"] = args.precision
    if args.sampler:
        options["sampler"] = args.sampler
    if args.steps is not None:
        options["steps"] = args.steps
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    vocoder = vocoder_from_experiment(expt_dir, checkpoint, not args.raw_weights, cfg=cfg, **options)
    convert = None
    if args.infer_mode == "infer_from_feature":
        convert = mel_converter(experiment.read_contract(), vocoder.cfg, args.mel_convention, args.mel_stats)
    run_inference(vocoder, args.infer_mode, args.output_dir, args.infer_datasets, args.feature_folder, args.audio_folder,
                  convert)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser, config_required=False)
    parser.add_argument("--infer_mode", required=True, choices=MODES)
    parser.add_argument("--infer_expt_dir", required=True,
                        help="experiment folder written by stage 2 (or its checkpoint/ folder, or one checkpoint folder)")
    parser.add_argument("--infer_output_dir", "--output_dir", dest="output_dir", required=True)
    parser.add_argument("--infer_datasets", nargs="*", default=None)
    parser.add_argument("--infer_feature_dir", "--feature_folder", dest="feature_folder", default=None)
    parser.add_argument("--infer_audio_dir", "--audio_folder", dest="audio_folder", default=None,
                        help="a folder of audio (any depth) or one audio file")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: the newest)")
    parser.add_argument("--infer_sampler", "--sampler", dest="sampler", default=None, choices=SAMPLER_NAMES,
                        help="default: config inference.sampler")
    parser.add_argument("--infer_steps", "--steps", dest="steps", type=int, default=None,
                        help="ddim steps; for searched, which searched schedule")
    parser.add_argument("--infer_batch_size", "--batch_size", dest="batch_size", type=int, default=None)
    parser.add_argument("--infer_mel_convention", "--mel_convention", dest="mel_convention", default=None,
                        help="infer_from_feature mels: ln | log10 | db | db_normalized | meanvar | linear, chained with + "
                             "(default: config)")
    parser.add_argument("--infer_mel_stats", "--mel_stats", dest="mel_stats", default=None,
                        help="(2, n_mel) .npy of per-bin mean and scale for meanvar")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    parser.add_argument("--infer_precision", "--precision", dest="precision", default=None, choices=list(PRECISIONS),
                        help="default: config inference.precision, else auto (fp16 on CUDA GPUs with tensor cores, "
                             "else fp32)")
    parser.add_argument("--infer_raw_weights", "--raw_weights", dest="raw_weights", action="store_true",
                        help="use the raw weights even when EMA weights exist")
    run(main, parser)
