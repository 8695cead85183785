#!/usr/bin/env bash
# DiffWave recipe: stage 1 preprocess, 2 train, 3 vocode, 4 evaluate. See egs/vocoder/diffusion/README.md.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail

exp_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work_dir=$(cd "$exp_dir/../../../.." && pwd)
caller_dir=$(pwd)

die() { echo "run.sh: $*" >&2; exit 2; }
# Paths given on the command line are the caller's; resolve them before moving to the repo root.
abspath() { case "$1" in "") echo "" ;; /*) echo "$1" ;; *) echo "$caller_dir/$1" ;; esac; }

stage="" name="" config="$exp_dir/exp_config.json" gpu="0" checkpoint="" resume_type=""
main_process_port=29500 num_machines=1 machine_rank=0 main_process_ip="" accelerate_config=""
infer_mode="" infer_datasets="" infer_feature_dir="" infer_audio_dir="" infer_expt_dir="" infer_output_dir=""
infer_sampler="" infer_steps="" infer_mel_convention="" infer_mel_stats="" infer_batch_size="" infer_precision="fp32" infer_raw_weights="" num_workers=""
max_steps="" log_level="info" eval_args=()
config_given=""

while [ $# -gt 0 ]; do
  opt="$1"
  case "$opt" in
    --*=*) value="${opt#*=}"; opt="${opt%%=*}" ;;
    --infer_raw_weights|--plot) value="" ;;
    --*) [ $# -ge 2 ] || die "option $opt needs a value"; value="$2"; shift ;;
    *) die "unexpected argument '$opt' (options start with --)" ;;
  esac
  shift
  case "$opt" in
    --stage) stage="$value" ;;
    --name) name="$value" ;;
    --config) config=$(abspath "$value"); config_given=1 ;;
    --gpu) gpu="$value" ;;
    --checkpoint) checkpoint=$(abspath "$value") ;;
    --resume_type) resume_type="$value" ;;
    --main_process_port) main_process_port="$value" ;;
    --num_machines) num_machines="$value" ;;
    --machine_rank) machine_rank="$value" ;;
    --main_process_ip) main_process_ip="$value" ;;
    --accelerate_config) accelerate_config=$(abspath "$value") ;;
    --num_workers) num_workers="$value" ;;
    --max_steps) max_steps="$value" ;;
    --log_level) log_level="$value" ;;
    --infer_mode) infer_mode="$value" ;;
    --infer_datasets) infer_datasets="$value" ;;
    --infer_feature_dir) infer_feature_dir=$(abspath "$value") ;;
    --infer_audio_dir) infer_audio_dir=$(abspath "$value") ;;
    --infer_expt_dir) infer_expt_dir=$(abspath "$value") ;;
    --infer_output_dir) infer_output_dir=$(abspath "$value") ;;
    --infer_sampler) infer_sampler="$value" ;;
    --infer_mel_convention) infer_mel_convention="$value" ;;
    --infer_mel_stats) infer_mel_stats=$(abspath "$value") ;;
    --infer_steps) infer_steps="$value" ;;
    --infer_batch_size) infer_batch_size="$value" ;;
    --infer_precision) infer_precision="$value" ;;
    --infer_raw_weights) infer_raw_weights=1 ;;
    --plot) eval_args+=(--plot) ;;
    --baseline) eval_args+=(--baseline "$value") ;;
    *) die "unknown option '$opt'" ;;
  esac
done

[ -n "$stage" ] || die "--stage is required (1 preprocess, 2 train, 3 inference, 4 evaluate)"
[ -f "$config" ] || die "config '$config' does not exist"
cd "$work_dir"
command -v python >/dev/null || die "no 'python' command: activate the environment install.sh made (source .venv/bin/activate)"
export PYTHONPATH="$work_dir${PYTHONPATH:+:$PYTHONPATH}"
# accelerate sets OMP_NUM_THREADS=1 on CPU unless it is set: give each process its share of the cores.
n_proc=$(echo "$gpu" | awk -F, '{print NF}')
cores=$(python -c "import os; print(len(os.sched_getaffinity(0)))")
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / n_proc > 0 ? cores / n_proc : 1 ))}"

# A resume with --checkpoint and no --config goes on with the experiment's own args.json (train.py reads it).
saved_config=""
if [ "$stage" = 2 ] && [ "$resume_type" = resume ] && [ -n "$checkpoint" ] && [ -z "$config_given" ]; then saved_config=1; fi

case "$stage" in
  1|2) [ -n "$saved_config" ] || python bins/vocoder/check_config.py --config "$config" --log_level "$log_level" \
         --stage "$( [ "$stage" = 1 ] && echo preprocess || echo train )" ;;
esac

case "$stage" in
  1)
    python bins/vocoder/preprocess.py --config "$config" --log_level "$log_level" ${num_workers:+--num_workers "$num_workers"}
    ;;
  2)
    [ -n "$name" ] || die "--name is required for stage 2 (the experiment goes to <log_dir>/<name>)"
    case "$resume_type" in ""|resume|finetune) ;; *) die "--resume_type must be resume or finetune, got '$resume_type'" ;; esac
    if [ "$resume_type" = finetune ] && [ -z "$checkpoint" ]; then die "--resume_type finetune needs --checkpoint"; fi
    launch=(--main_process_port "$main_process_port")
    total=$(( n_proc * num_machines ))
    if [ -n "$accelerate_config" ]; then
      launch+=(--config_file "$accelerate_config")
    else
      launch+=(--num_processes "$total" --num_machines "$num_machines" --machine_rank "$machine_rank")
      [ -n "$main_process_ip" ] && launch+=(--main_process_ip "$main_process_ip")
      # Several processes go through torchrun (--multi_gpu); without CUDA the trainer makes it a gloo group.
      # accelerate's --cpu launcher would start only one process.
      if [ "$total" -gt 1 ]; then
        launch+=(--multi_gpu)
      elif ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        launch+=(--cpu)
      fi
    fi
    single=""
    [ -z "$accelerate_config" ] && [ "$total" -eq 1 ] && single=1
    if [ -z "$single" ] && [ "$machine_rank" = 0 ] && ! python -c "
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try: s.bind(('', $main_process_port))
except OSError: sys.exit(1)" 2>/dev/null; then
      die "--main_process_port $main_process_port is already in use; choose a free port"
    fi
    train_args=(--exp_name "$name" --log_level "$log_level")
    [ -z "$saved_config" ] && train_args+=(--config "$config")
    [ -n "$resume_type" ] && train_args+=(--resume_type "$resume_type")
    [ -n "$checkpoint" ] && train_args+=(--checkpoint "$checkpoint")
    [ -n "$max_steps" ] && train_args+=(--max_steps "$max_steps")
    if [ -n "$single" ]; then
      # One process needs no launcher: errors stay one line, and the process keeps its threads.
      CUDA_VISIBLE_DEVICES="$gpu" python bins/vocoder/train.py "${train_args[@]}"
    else
      CUDA_VISIBLE_DEVICES="$gpu" accelerate launch "${launch[@]}" bins/vocoder/train.py "${train_args[@]}"
    fi
    ;;
  3)
    [ -n "$infer_expt_dir" ] || die "--infer_expt_dir is required for stage 3"
    case "$infer_mode" in
      infer_from_dataset) [ -n "$infer_datasets" ] || die "--infer_datasets is required for infer_from_dataset" ;;
      infer_from_feature) [ -d "$infer_feature_dir" ] || die "--infer_feature_dir '$infer_feature_dir' is not a folder" ;;
      infer_from_audio) [ -d "$infer_audio_dir" ] || die "--infer_audio_dir '$infer_audio_dir' is not a folder" ;;
      "") die "--infer_mode is required: infer_from_dataset, infer_from_feature or infer_from_audio" ;;
      *) die "unknown --infer_mode '$infer_mode': use infer_from_dataset, infer_from_feature or infer_from_audio" ;;
    esac
    args=(--infer_mode "$infer_mode" --infer_expt_dir "$infer_expt_dir" --output_dir "${infer_output_dir:-$infer_expt_dir/result}"
          --precision "$infer_precision" --log_level "$log_level")
    # shellcheck disable=SC2206 # the dataset list is space-separated on purpose
    [ -n "$infer_datasets" ] && args+=(--infer_datasets $infer_datasets)
    [ -n "$infer_feature_dir" ] && args+=(--feature_folder "$infer_feature_dir")
    [ -n "$infer_audio_dir" ] && args+=(--audio_folder "$infer_audio_dir")
    [ -n "$checkpoint" ] && args+=(--checkpoint "$checkpoint")
    [ -n "$infer_sampler" ] && args+=(--sampler "$infer_sampler")
    [ -n "$infer_mel_convention" ] && args+=(--mel_convention "$infer_mel_convention")
    [ -n "$infer_mel_stats" ] && args+=(--mel_stats "$infer_mel_stats")
    [ -n "$infer_steps" ] && args+=(--steps "$infer_steps")
    [ -n "$infer_batch_size" ] && args+=(--batch_size "$infer_batch_size")
    [ -n "$infer_raw_weights" ] && args+=(--raw_weights)
    CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-$gpu}" python bins/vocoder/inference.py "${args[@]}"
    ;;
  4)
    [ -n "$infer_expt_dir" ] || die "--infer_expt_dir is required for stage 4"
    out="${infer_output_dir:-$infer_expt_dir/result}"
    python bins/vocoder/evaluate.py --ref_dir "$out/gt" --pred_dir "$out/pred" --output_dir "$out/eval" \
      --config "$infer_expt_dir/args.json" --log_level "$log_level" "${eval_args[@]}"
    ;;
  *) die "unknown --stage '$stage': use 1, 2, 3 or 4" ;;
esac
