"""The Makefile's install targets: ``make demo`` installs the package without the dev extra, ``make test``
installs ``.[dev]`` (also after ``make demo``), and neither reinstalls while pyproject.toml is unchanged.

Real ``make`` on a copy of the Makefile; the Python it is given is a stand-in that records the commands
(pip, ruff, pytest, slsr) instead of installing anything, so the test takes a second and needs no network."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# `PY -m venv DIR` makes DIR/bin/{python,ruff,slsr} that append their arguments to the log
FAKE_PY = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  for tool in python ruff slsr; do
    printf '#!/bin/sh\\necho "%s $*" >> "%s"\\n' "$tool" "$LOG" > "$3/bin/$tool"
    chmod +x "$3/bin/$tool"
  done
  exit 0
fi
exit 1
"""


@pytest.fixture
def checkout(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    return tmp_path


def _make(checkout: Path, target: str) -> list[str]:
    log = checkout / "commands.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "LOG": str(log)}
    res = subprocess.run(["make", "-s", target, f"PY={checkout / 'fake-python'}"], cwd=checkout, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    return log.read_text().splitlines() if log.exists() else []


def _installs(lines: list[str]) -> list[str]:
    return [line for line in lines if " pip install " in f" {line} " and "--upgrade" not in line]


def test_demo_installs_without_dev_extras_then_test_installs_them(checkout):
    demo = _make(checkout, "demo")
    assert _installs(demo) == ["python -m pip install --quiet -e ."]
    assert demo[-1] == "slsr demo"

    test = _make(checkout, "test")  # after `make demo`: the dev extra is still installed
    assert _installs(test) == ["python -m pip install --quiet -e .[dev]"]
    assert "ruff check ." in test and any(line.startswith("python -m pytest") for line in test)

    assert _installs(_make(checkout, "test")) == []  # nothing changed: no reinstall
    assert _installs(_make(checkout, "demo")) == []  # the dev install covers the demo too

    time.sleep(1.1)  # a newer pyproject.toml reinstalls
    (checkout / "pyproject.toml").touch()
    assert _installs(_make(checkout, "demo")) == ["python -m pip install --quiet -e ."]
