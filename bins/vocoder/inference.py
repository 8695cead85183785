"""Stage 3: vocode a dataset's test split, a folder of mels, or a folder of audio."""

import argparse

from models.vocoders.diffusion.diffusion_vocoder_inference import experiment_config, vocoder_from_experiment
from models.vocoders.diffusion.inference_modes import MODES, run_inference
from processors.mel_conventions import mel_converter
from utils.cli import add_common_args, run
from utils.config import validate


def main(args: argparse.Namespace) -> None:
    validate(experiment_config(args.infer_expt_dir), "inference")
    options = {"seed": args.seed, "device": args.device, "precision": args.precision}
    if args.sampler:
        options["sampler"] = args.sampler
    if args.steps:
        options["steps"] = args.steps
    if args.batch_size:
        options["batch_size"] = args.batch_size
    vocoder = vocoder_from_experiment(args.infer_expt_dir, args.checkpoint, not args.raw_weights, **options)
    convert = None
    if args.infer_mode == "infer_from_feature":
        convert = mel_converter(args.infer_expt_dir, vocoder.cfg, args.mel_convention, args.mel_stats)
    run_inference(vocoder, args.infer_mode, args.output_dir, args.infer_datasets, args.feature_folder, args.audio_folder,
                  convert)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser, config_required=False)
    parser.add_argument("--infer_mode", required=True, choices=MODES)
    parser.add_argument("--infer_expt_dir", required=True, help="experiment folder written by stage 2")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--infer_datasets", nargs="*", default=None)
    parser.add_argument("--feature_folder", default=None)
    parser.add_argument("--audio_folder", default=None)
    parser.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: the newest)")
    parser.add_argument("--sampler", default=None, help="fast | full | ddim | searched (default: config inference.sampler)")
    parser.add_argument("--steps", type=int, default=None, help="ddim steps; for searched, which searched schedule")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--mel_convention", default=None,
                        help="infer_from_feature mels: ln | log10 | db_normalized | meanvar, chained with + (default: config)")
    parser.add_argument("--mel_stats", default=None, help="(2, n_mel) .npy of per-bin mean and scale for meanvar")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--raw_weights", action="store_true", help="use the raw weights even when EMA weights exist")
    run(main, parser)
