"""Hand-written code stays ruff- and mypy-clean (versions pinned in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)


def test_ruff() -> None:
    r = run("ruff", "check", "server", "client", "scripts", "tests", "bench")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy() -> None:
    r = run("mypy", "server", "client")
    assert r.returncode == 0, r.stdout + r.stderr
