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

usage() {
  cat <<'USAGE'
usage: sh egs/vocoder/diffusion/diffwave/run.sh -s|--stage N [options]   (guide: egs/vocoder/diffusion/README.md)

 -s, --stage N              1 preprocess, 2 train, 3 vocode, 4 evaluate (required)
 -c, --config FILE          experiment config (default diffwave/exp_config.json); in stage 3 only its
                            inference section applies: the model and mel come from the experiment's args.json
 -n, --name NAME            stage 2: the experiment goes to <log_dir>/<name>
     --gpu IDS              devices for every stage, e.g. "0,1" (sets CUDA_VISIBLE_DEVICES; stage 2 starts
                            one process per id, CPU processes without CUDA); default "0"
     --log_level LEVEL      debug | info | warning | error; debug shows tracebacks
 -h, --help                 this summary
stage 1  --num_workers N            extraction processes (default: the CPUs the job may use)
stage 2  --resume_type TYPE         resume (everything, exactly) | finetune (weights only)
         --checkpoint DIR           checkpoint folder, or an experiment / its checkpoint/ folder (newest)
         --max_steps N              stop after N optimizer steps (overrides train.max_steps)
         --main_process_port PORT   process-group port (default 29500)
         --num_machines N, --machine_rank R, --main_process_ip IP, --accelerate_config FILE   several machines
stage 3  --infer_mode MODE          infer_from_dataset | infer_from_feature | infer_from_audio (required)
         --infer_expt_dir DIR       experiment written by stage 2 (or its checkpoint/ folder, or one checkpoint)
         --infer_datasets "A B"     dataset mode: datasets whose test split is vocoded
         --infer_feature_dir DIR    feature mode: folder with mels/*.npy (or *.npy)
         --infer_audio_dir DIR      audio mode: folder of audio at any rate, any depth (or one audio file)
         --infer_output_dir DIR     where pred/ and gt/ go (default <infer_expt_dir>/result; also stage 4)
         --checkpoint DIR           one checkpoint folder (default: the newest)
         --infer_sampler NAME       fast (6 steps) | full (50) | ddim | searched (default: config inference.sampler)
         --infer_steps N            ddim: number of steps; searched: which searched schedule
         --infer_batch_size N       utterances per batch (default: config inference.batch_size)
         --infer_precision P        auto | fp32 | fp16 | bf16 (default: config inference.precision, else auto:
                                    fp16 on CUDA GPUs with tensor cores, else fp32)
         --infer_raw_weights        the raw weights even when EMA weights exist
         --infer_mel_convention C   feature mode: ln | log10 | db | db_normalized | meanvar | linear, chained with +
         --infer_mel_stats FILE     feature mode, meanvar: (2, n_mel) .npy of per-bin mean and scale
stage 4  --infer_expt_dir DIR, --infer_output_dir DIR   the stage 3 output to score
         --baseline griffinlim      also score Griffin-Lim on the same mels
         --plot                     a PNG per utterance
Options take their value as the next argument or after '=' (--stage=3); --infer_raw_weights and --plot take none.
USAGE
}


stage="" name="" config="$exp_dir/exp_config.json" gpu="0" checkpoint="" resume_type=""
main_process_port=29500 num_machines=1 machine_rank=0 main_process_ip="" accelerate_config=""
infer_mode="" infer_datasets="" infer_feature_dir="" infer_audio_dir="" infer_expt_dir="" infer_output_dir=""
infer_sampler="" infer_steps="" infer_mel_convention="" infer_mel_stats="" infer_batch_size="" infer_precision="" infer_raw_weights="" num_workers=""
max_steps="" log_level="info" eval_args=() baseline=""
given=" "  # every option on the command line, by its long name: for the checks below

while [ $# -gt 0 ]; do
  opt="$1"
  case "$opt" in
    -h|--help) usage; exit 0 ;;
    --infer_raw_weights=*|--plot=*) die "${opt%%=*} takes no value (given '$opt'): leave it out to turn it off" ;;
    --*=*) value="${opt#*=}"; opt="${opt%%=*}" ;;
    --infer_raw_weights|--plot) value="" ;;
    -c|-n|-s|--*) [ $# -ge 2 ] || die "option $opt needs a value"; value="$2"; shift ;;
    *) die "unexpected argument '$opt' (options start with --; see --help)" ;;
  esac
  shift
  case "$opt" in -c) opt=--config ;; -n) opt=--name ;; -s) opt=--stage ;; esac
  case "$given" in *" $opt "*) die "$opt is given twice" ;; esac
  case "$opt" in --infer_raw_weights|--plot) ;; *) [ -n "$value" ] || die "$opt needs a value (given empty)" ;; esac
  given="$given$opt "
  case "$opt" in
    --stage) stage="$value" ;;
    --name) name="$value" ;;
    --config) config=$(abspath "$value") ;;
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
    --baseline) baseline="$value"; eval_args+=(--baseline "$value") ;;
    *) die "unknown option '$opt' (see --help)" ;;
  esac
done

is_given() { case "$given" in *" $1 "*) return 0 ;; esac; return 1; }
# A flag the chosen stage (or mode) would not read is an error, not a silent no-op.
only_for() {  # only_for "<stages>" FLAG...
  local stages="$1" flag; shift
  for flag in "$@"; do
    if is_given "$flag"; then
      case " $stages " in *" $stage "*) ;; *) die "$flag does not apply to stage $stage (it is for stage ${stages// / or })" ;; esac
    fi
  done
}
not_with() {  # not_with "<why>" FLAG...
  local why="$1" flag; shift
  for flag in "$@"; do
    if is_given "$flag"; then die "$flag does not apply $why"; fi
  done
}

[ -n "$stage" ] || die "--stage is required (1 preprocess, 2 train, 3 inference, 4 evaluate; see --help)"
case "$stage" in 1|2|3|4) ;; *) die "unknown --stage '$stage': use 1, 2, 3 or 4" ;; esac
only_for 1 --num_workers
only_for 2 --resume_type --max_steps --main_process_port --num_machines --machine_rank --main_process_ip --accelerate_config
only_for "2 3" --checkpoint
only_for 3 --infer_mode --infer_datasets --infer_feature_dir --infer_audio_dir --infer_sampler --infer_steps \
  --infer_batch_size --infer_precision --infer_raw_weights --infer_mel_convention --infer_mel_stats
only_for "3 4" --infer_expt_dir --infer_output_dir
only_for 4 --plot --baseline
only_for "1 2 3" --config  # stage 4 scores with the mel of --infer_expt_dir's experiment (its args.json)
if [ -n "$accelerate_config" ]; then
  not_with "with --accelerate_config (the file sets it)" --num_machines --machine_rank --main_process_ip
fi
# A rank outside the machines, or machines without machine 0's address, waited for a rendezvous that never came.
case "$num_machines" in ""|*[!0-9]*) die "--num_machines must be a whole number from 1, got '$num_machines'" ;; esac
case "$machine_rank" in ""|*[!0-9]*) die "--machine_rank must be a whole number from 0, got '$machine_rank'" ;; esac
num_machines=$(( 10#$num_machines )) machine_rank=$(( 10#$machine_rank ))
[ "$num_machines" -ge 1 ] || die "--num_machines must be a whole number from 1, got '$num_machines'"
[ "$machine_rank" -lt "$num_machines" ] || die "--machine_rank $machine_rank is no machine of --num_machines $num_machines (ranks 0 to $(( num_machines - 1 )))"
if [ "$num_machines" -gt 1 ] && [ -z "$main_process_ip" ]; then
  die "--num_machines $num_machines needs --main_process_ip: the address of machine 0, the same on every machine"
fi
case "$log_level" in debug|info|warning|error) ;; *) die "--log_level must be debug, info, warning or error, got '$log_level'" ;; esac
case "$infer_precision" in ""|auto|fp32|fp16|bf16) ;; *) die "--infer_precision must be auto, fp32, fp16 or bf16, got '$infer_precision'" ;; esac
case ",$gpu," in *,,*|*[[:space:]]*) die "--gpu must list device ids separated by commas, e.g. \"0,1\", got '$gpu'" ;; esac
IFS=, read -ra gpu_ids <<< "$gpu"
for id in "${gpu_ids[@]}"; do
  case "$id" in
    *[!0-9]*) case "$id" in GPU-?*|MIG-?*) ;; *) die "--gpu: '$id' is no device id (an index or a GPU-/MIG- UUID)" ;; esac ;;
  esac
  case ",${seen_ids:-}," in *",$id,"*) die "--gpu names device '$id' twice: one process a device" ;; esac
  seen_ids="${seen_ids:-}${seen_ids:+,}$id"
done
digits="${main_process_port#"${main_process_port%%[!0]*}"}"  # without leading zeros: 08 is port 8, not octal
case "$main_process_port" in
  ""|*[!0-9]*) port_ok="" ;;
  *) port_ok=$(( ${#digits} <= 5 && 10#0$digits >= 1 && 10#0$digits <= 65535 )) ;;
esac
[ "$port_ok" = 1 ] || die "--main_process_port must be a port number from 1 to 65535, got '$main_process_port'"
main_process_port=$digits
case "$baseline" in ""|griffinlim) ;; *) die "--baseline must be griffinlim, got '$baseline'" ;; esac
case "$infer_sampler" in ""|fast|full|ddim|searched) ;; *) die "--infer_sampler must be fast, full, ddim or searched, got '$infer_sampler'" ;; esac
[ -f "$config" ] || die "config '$config' does not exist"
cd "$work_dir"
command -v python >/dev/null || die "no 'python' command: activate the environment install.sh made (source .venv/bin/activate)"
export PYTHONPATH="$work_dir${PYTHONPATH:+:$PYTHONPATH}"
# --gpu (default "0") picks the devices of every stage, over an inherited CUDA_VISIBLE_DEVICES.
export CUDA_VISIBLE_DEVICES="$gpu"
# accelerate sets OMP_NUM_THREADS=1 on CPU unless it is set: give each process its share of the cores.
n_proc=$(echo "$gpu" | awk -F, '{print NF}')
cores=$(python -c "import os; print(len(os.sched_getaffinity(0)))")
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / n_proc > 0 ? cores / n_proc : 1 ))}"
# Threads waiting at a barrier sleep instead of spinning: beside another busy job, spinning threads
# take the very cores the thread they wait for needs (see "Sharing the machine" in the guide).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# The CUDA allocator grows its segments instead of caching blocks of every size: reserved memory stays
# near what is in use, which stage 3's memory budget (inference.gpu_memory_gib) counts on.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

# A resume with --checkpoint and no --config goes on with the experiment's own args.json (train.py reads it).
saved_config=""
if [ "$stage" = 2 ] && [ "$resume_type" = resume ] && [ -n "$checkpoint" ] && ! is_given --config; then saved_config=1; fi

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
    if [ -n "$checkpoint" ] && [ -z "$resume_type" ]; then die "--checkpoint in stage 2 needs --resume_type resume or finetune"; fi
    launch=(--main_process_port "$main_process_port")
    total=$(( n_proc * num_machines ))
    if [ -n "$accelerate_config" ]; then
      launch+=(--config_file "$accelerate_config")
    else
      # Given, so accelerate does not warn of defaults and advise `accelerate config`: the trainer sets the precision
      # (train.mixed_precision) and compiles (train.compile) itself.
      launch+=(--num_processes "$total" --num_machines "$num_machines" --machine_rank "$machine_rank"
               --mixed_precision no --dynamo_backend no)
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
    # exec: the trainer (or launcher) takes this shell's place, so a SIGTERM (a scheduler's time limit) or Ctrl-C
    # reaches it alone and the job lasts until its final checkpoint is saved; its exit status is the script's.
    if [ -n "$single" ]; then
      # One process needs no launcher: errors stay one line, and the process keeps its threads.
      exec python bins/vocoder/train.py "${train_args[@]}"
    else
      exec python bins/vocoder/launch.py "${launch[@]}" bins/vocoder/train.py "${train_args[@]}"
    fi
    ;;
  3)
    [ -n "$infer_expt_dir" ] || die "--infer_expt_dir is required for stage 3"
    case "$infer_mode" in
      infer_from_dataset) [ -n "$infer_datasets" ] || die "--infer_datasets is required for infer_from_dataset"
        not_with "to infer_from_dataset" --infer_feature_dir --infer_audio_dir --infer_mel_convention --infer_mel_stats ;;
      infer_from_feature) [ -d "$infer_feature_dir" ] || die "--infer_feature_dir '$infer_feature_dir' is not a folder"
        not_with "to infer_from_feature" --infer_datasets --infer_audio_dir ;;
      infer_from_audio) [ -d "$infer_audio_dir" ] || [ -f "$infer_audio_dir" ] ||
          die "--infer_audio_dir '$infer_audio_dir' is neither a folder nor a file"
        not_with "to infer_from_audio (its mels are computed here)" --infer_datasets --infer_feature_dir \
          --infer_mel_convention --infer_mel_stats ;;
      "") die "--infer_mode is required: infer_from_dataset, infer_from_feature or infer_from_audio" ;;
      *) die "unknown --infer_mode '$infer_mode': use infer_from_dataset, infer_from_feature or infer_from_audio" ;;
    esac
    args=(--infer_mode "$infer_mode" --infer_expt_dir "$infer_expt_dir" --infer_output_dir "${infer_output_dir:-$infer_expt_dir/result}"
          --log_level "$log_level")
    # the experiment's args.json defines the model; a --config typed here adds its inference section
    if is_given --config; then args+=(--config "$config"); fi
    # shellcheck disable=SC2206 # the dataset list is space-separated on purpose
    [ -n "$infer_datasets" ] && args+=(--infer_datasets $infer_datasets)
    [ -n "$infer_feature_dir" ] && args+=(--infer_feature_dir "$infer_feature_dir")
    [ -n "$infer_audio_dir" ] && args+=(--infer_audio_dir "$infer_audio_dir")
    [ -n "$checkpoint" ] && args+=(--checkpoint "$checkpoint")
    [ -n "$infer_sampler" ] && args+=(--infer_sampler "$infer_sampler")
    [ -n "$infer_mel_convention" ] && args+=(--infer_mel_convention "$infer_mel_convention")
    [ -n "$infer_mel_stats" ] && args+=(--infer_mel_stats "$infer_mel_stats")
    [ -n "$infer_steps" ] && args+=(--infer_steps "$infer_steps")
    [ -n "$infer_batch_size" ] && args+=(--infer_batch_size "$infer_batch_size")
    [ -n "$infer_precision" ] && args+=(--infer_precision "$infer_precision")
    [ -n "$infer_raw_weights" ] && args+=(--infer_raw_weights)
    python bins/vocoder/inference.py "${args[@]}"
    ;;
  4)
    [ -n "$infer_expt_dir" ] || die "--infer_expt_dir is required for stage 4"
    out="${infer_output_dir:-$infer_expt_dir/result}"  # where stage 3 wrote, given the same flags
    # the mel of the experiment's args.json, found as stage 3 finds it (an experiment, its checkpoint/ folder, one checkpoint)
    python bins/vocoder/evaluate.py --ref_dir "$out/gt" --pred_dir "$out/pred" --output_dir "$out/eval" \
      --expt_dir "$infer_expt_dir" --log_level "$log_level" "${eval_args[@]}"
    ;;
esac
