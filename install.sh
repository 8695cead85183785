#!/usr/bin/env bash
# Install what the toolkit needs into the active virtual environment, or into .venv (made when none is
# active): the CPU build of torch first (from local disk where this machine has it), then the project's
# dependencies. `bash install.sh test` adds the test tools.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=utils/venv.sh
. utils/venv.sh
use_venv
extra="${1:-}"
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check ".${extra:+[$extra]}"
python -c "import sys, torch, librosa, accelerate, soundfile, json5; print(f'installed in {sys.prefix}: torch {torch.__version__}, accelerate {accelerate.__version__}, librosa {librosa.__version__}')"
