#!/usr/bin/env bash
# What a briefly lent GPU machine runs for issue 12, as two commands of under 10 minutes each:
#   bash benchmarks/gpu_lease.sh suite     # GPU tests (190 s), the card's peaks, stage 3 and stage 2 (555 s in all)
#   bash benchmarks/gpu_lease.sh quality   # quality per GPU-minute: fast and plain runs, MINUTES (3.5) each
# Arguments after the first go to the Python command (e.g. `suite --only train --budget_s 150`).
# Figures and logs go to $OUT (the device tool's output folder; default: here). The GPU image lacks
# some dependencies: carry .whl (bash ../shared/gpu/fetch_wheels.sh) and, for `quality`, the corpus
# .quality/speech (bash benchmarks/speech_corpus.sh .quality/speech 240, about 34 MB).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=$(realpath "${OUT:-.}")
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$PWD/.site" .whl/*.whl
export PYTHONPATH="$PWD/.site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
case "${1:-}" in
  suite) python3 -m benchmarks.gpu_suite --tests_s 190 --budget_s 555 --out "$out/gpu_results.json" "${@:2}" 2>&1 | tee "$out/gpu_suite.log" ;;
  quality)
    [ -d .quality/speech ] || { echo "no .quality/speech: make it with benchmarks/speech_corpus.sh and carry it" >&2; exit 2; }
    rc=0
    python3 -m benchmarks.quality --corpus .quality/speech --minutes "${MINUTES:-3.5}" --both --out "$out/quality.json" \
      --work /tmp/quality "${@:2}" 2>&1 | tee "$out/quality.log" || rc=$?
    # each variant's result/ (pred/, gt/, eval/), to score again where a metric's package is missing (pesq there)
    (cd /tmp/quality/ckpts && tar czf "$out/quality_outputs.tgz" ./*/result ./*/args.json) || true
    exit "$rc" ;;
  *) echo "usage: bash benchmarks/gpu_lease.sh suite|quality" >&2; exit 2 ;;
esac
