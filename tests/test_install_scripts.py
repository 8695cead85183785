"""utils/venv.sh, which install.sh, demo.sh and test.sh source: which environment they install into.

Fake interpreters record how they are called, so these run in milliseconds; .ci/run does the real
install from a bare system python3 with no `python` command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/bin/sh
echo "$0 $*" >> "{log}"
case "$*" in
  "-c "*) exit {version_check} ;;
  "-m venv --clear .venv") mkdir -p .venv/bin && cp "$0" .venv/bin/python && exit 0 ;;
  "-m pip --version") exit 0 ;;
esac
exit 3
"""


def fake_python(path: Path, log: Path, version_ok: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FAKE_PYTHON.format(log=log, version_check=0 if version_ok else 1))
    path.chmod(0o755)


def use_venv(cwd: Path, bin_dir: Path, virtual_env: str | None = None, system: bool = True) -> subprocess.CompletedProcess:
    """Source utils/venv.sh in `cwd` with `bin_dir` (and the system's tools) on PATH; print the result."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin" if system else str(bin_dir)
    if virtual_env:
        env["VIRTUAL_ENV"] = virtual_env
    script = f'. "{REPO}/utils/venv.sh" && use_venv && echo "VIRTUAL_ENV=$VIRTUAL_ENV" && command -v python'
    return subprocess.run(["/bin/bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=30)


def test_no_active_environment_makes_and_then_reuses_dot_venv(tmp_path):
    log = tmp_path / "calls.log"
    fake_python(tmp_path / "bin" / "python3", log)
    project = tmp_path / "project"
    project.mkdir()
    first = use_venv(project, tmp_path / "bin")
    assert first.returncode == 0, first.stderr
    assert f"VIRTUAL_ENV={project}/.venv" in first.stdout and first.stdout.strip().endswith(f"{project}/.venv/bin/python")
    assert "-m venv --clear .venv" in log.read_text()
    log.write_text("")
    second = use_venv(project, tmp_path / "bin")
    assert second.returncode == 0 and f"VIRTUAL_ENV={project}/.venv" in second.stdout
    assert "-m venv" not in log.read_text()  # reused, not made again


def test_an_active_environment_is_used_as_it_is(tmp_path):
    log = tmp_path / "calls.log"
    fake_python(tmp_path / "bin" / "python3", log)
    fake_python(tmp_path / "active" / "bin" / "python", log)
    project = tmp_path / "project"
    project.mkdir()
    result = use_venv(project, tmp_path / "bin", virtual_env=str(tmp_path / "active"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"{tmp_path}/active/bin/python") and not (project / ".venv").exists()


def test_missing_or_old_python3_is_a_one_line_error(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    missing = use_venv(project, tmp_path / "empty", system=False)
    assert missing.returncode == 1 and missing.stderr.strip() == "python3 not found: install Python 3.10 or newer"
    fake_python(tmp_path / "old" / "python3", tmp_path / "calls.log", version_ok=False)
    old = use_venv(project, tmp_path / "old", system=False)
    assert old.returncode == 1 and old.stderr.startswith("Python 3.10 or newer is needed")
    assert not (project / ".venv").exists()


def test_run_sh_without_python_says_to_activate_the_environment():
    if shutil.which("python", path="/usr/bin:/bin"):
        pytest.skip("this system has a `python` command")
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # a new machine's system tools: python3 at most, no `python`
    env.pop("VIRTUAL_ENV", None)
    run_sh = REPO / "egs/vocoder/diffusion/diffwave/run.sh"
    result = subprocess.run(["/bin/bash", str(run_sh), "--stage", "1"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == ("run.sh: no 'python' command: activate the environment install.sh made "
                                     "(source .venv/bin/activate)")
