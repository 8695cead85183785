# shellcheck shell=bash
# Sourced by install.sh, demo.sh and test.sh from the repository root: `use_venv` makes `python`
# and `pip` those of the active virtual environment or, when none is active, of the project's own
# .venv, made from python3 on first use. A system Python may have no `python` command and may
# refuse pip installs (PEP 668, "externally managed"); inside a virtual environment both work.
# pip reads its configuration (index, find-links, constraints) from the same files inside the venv.

use_venv() {
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    PATH="$VIRTUAL_ENV/bin:$PATH"
    export PATH
    return
  fi
  if ! { [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; }; then
    if ! command -v python3 >/dev/null 2>&1; then
      echo "python3 not found: install Python 3.10 or newer" >&2
      exit 1
    fi
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
      echo "Python 3.10 or newer is needed; python3 is $(python3 -V 2>&1)" >&2
      exit 1
    fi
    echo "creating the project's virtual environment .venv (python3 -m venv)"
    if ! python3 -m venv --clear .venv; then
      echo "python3 -m venv failed; on Debian or Ubuntu: apt install python3-venv" >&2
      exit 1
    fi
  fi
  VIRTUAL_ENV="$PWD/.venv"
  PATH="$VIRTUAL_ENV/bin:$PATH"
  export VIRTUAL_ENV PATH
}
