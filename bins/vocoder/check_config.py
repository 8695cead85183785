"""Check a recipe config for a stage before anything heavy starts (run.sh calls this first).

Imports no torch, so a typo costs a fraction of a second, and the one-line error is not
buried under a launcher's traceback.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, as run.sh sets PYTHONPATH: `python bins/...` works

from utils.config import ConfigError, load_config
from utils.config_schema import STAGES, validate

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--stage", required=True, choices=list(STAGES))
    parser.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args()
    try:
        validate(load_config(args.config), args.stage)
    except ConfigError as err:
        if args.log_level == "debug":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
