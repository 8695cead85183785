#!/usr/bin/env bash
# Install with the test tools (into the active virtual environment, or .venv), then run the tests there.
# Arguments go to pytest, e.g. `bash test.sh tests/test_recipe.py -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash install.sh test
# shellcheck source=utils/venv.sh
. utils/venv.sh
use_venv
python -m pytest "$@"
