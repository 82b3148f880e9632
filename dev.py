#!/usr/bin/env python3
"""Bootstrap deploybot's virtual environment, then run it: `python3 dev.py serve|test|lint`.

`python3 dev.py fake-ubiops` and `python3 dev.py send FILE` are the README's "try it"
helpers (scripts/tryit.py): a fake UbiOps, and a signed delivery of a Jira payload.

Needs nothing but python3: the first run creates `.venv` and installs the project with
its test and PostgreSQL extras; later runs reinstall only when pyproject.toml changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".deploybot-installed"


def ensure_venv() -> None:
    """Create the venv and (re)install the project when pyproject.toml changed."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.is_file() and STAMP.read_text() == digest:
        return
    # Commands started together on a fresh clone (the README's "try it": fake-ubiops and
    # serve) would build one venv at once and break it: the later one waits, then finds
    # it ready.
    with open(ROOT / ".venv.lock", "w") as lock:
        if os.name != "nt":
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        if not (STAMP.is_file() and STAMP.read_text() == digest):
            _install(digest)


def _install(digest: str) -> None:
    if not (BIN / "python").exists():
        print("dev.py: creating .venv", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "-e", f"{ROOT}[test,postgres]"], check=True)
    STAMP.write_text(digest)


def run(*argv: str) -> int:
    return subprocess.run(argv, cwd=ROOT).returncode


def main(args: list[str]) -> int:
    command, rest = (args[0], args[1:]) if args else ("", [])
    if command not in {"serve", "test", "lint", "bench", "fake-ubiops", "send"}:
        print(__doc__, file=sys.stderr)
        return 2
    ensure_venv()
    if command == "serve":
        os.execv(str(BIN / "deploybot"), [str(BIN / "deploybot"), "serve", *rest])
    if command == "test":
        return run(str(BIN / "pytest"), "-rs", *rest)  # -rs: say why a test was skipped
    if command in {"fake-ubiops", "send"}:
        # Replaced, not a child: `kill %1` in the README stops the fake itself.
        script = str(ROOT / "scripts" / "tryit.py")
        os.execv(str(BIN / "python"), [str(BIN / "python"), script, command, *rest])
    if command == "bench":
        return run(str(BIN / "python"), *rest)
    return (
        run(str(BIN / "ruff"), "check", ".")
        or run(str(BIN / "ruff"), "format", "--check", ".")
        or run(str(BIN / "mypy"))
        or run(str(BIN / "lint-imports"))
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
