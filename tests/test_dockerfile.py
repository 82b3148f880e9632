"""The Dockerfile, without a Docker engine: its build steps reproduced in a clean venv.

The build stage's COPY and RUN steps are replayed in a temporary folder (pip's cache
kept, so a second run is quick), then `deploybot serve` starts from that venv the way
the image's CMD, ENV and VOLUMEs say, and the image's own HEALTHCHECK command must pass.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
INSTALL_TIMEOUT_S = 240


@dataclass
class Stage:
    """One build stage: its instructions as (keyword, argument text)."""

    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages of instructions (continuations joined, comments gone)."""
    joined = re.sub(r"\\\n", " ", text)
    stages: list[Stage] = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arg = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append(Stage())
        stages[-1].instructions.append((keyword.upper(), " ".join(arg.split())))
    return stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for arg in stage.args("ENV"):
        env.update(pair.partition("=")[::2] for pair in shlex.split(arg))
    return env


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_runtime_image_is_locked_down(stages: list[Stage]) -> None:
    runtime = stages[-1]
    [user] = runtime.args("USER")
    assert user not in {"root", "0"} and not user.startswith("0:")
    [healthcheck] = runtime.args("HEALTHCHECK")
    assert "/healthz" in healthcheck
    [volumes] = runtime.args("VOLUME")
    env = env_of(runtime)
    mounted = set(json.loads(volumes))
    assert env["DEPLOYBOT_RULES_DIR"] in mounted
    database_dir = str(Path(env["DEPLOYBOT_DATABASE_URL"].split(":///", 1)[1]).parent)
    assert database_dir in mounted  # the SQLite file lives on a volume
    [cmd] = runtime.args("CMD")
    assert json.loads(cmd) == ["deploybot", "serve"]
    assert len(stages) >= 2, "a build stage, and a runtime stage without build tools"


def test_dependencies_install_before_the_code_is_copied(stages: list[Stage]) -> None:
    """A code change must not reinstall every dependency: the layer installing them comes
    before `COPY bot`, and sees only pyproject.toml (and the README it names)."""
    steps = stages[0].instructions
    code_copied = next(i for i, (kw, arg) in enumerate(steps) if kw == "COPY" and "bot" in arg)
    before = steps[:code_copied]
    assert [arg for kw, arg in before if kw == "COPY"] == ["pyproject.toml README.md ./"]
    installs = [arg for kw, arg in before if kw == "RUN"]
    assert installs and "dependencies" in installs[-1] and "postgres" in installs[-1]
    assert any("--no-deps" in arg for kw, arg in steps[code_copied:] if kw == "RUN")


def test_docker_context_keeps_the_example_rules() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    shipped = [p.relative_to(ROOT).as_posix() for p in (ROOT / "rules").rglob("*") if p.is_file()]
    assert shipped
    for path in shipped:
        for pattern in patterns:
            parts = path.split("/")
            prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
            assert not any(fnmatch.fnmatch(p, pattern.strip("/")) for p in prefixes), (
                path,
                pattern,
            )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _replay_build(build: Stage, workdir: Path, venv: Path) -> None:
    """Replay the build stage's COPY and RUN steps into `workdir`, with /opt/... -> `venv`."""
    [target] = build.args("WORKDIR")
    for arg in build.args("COPY"):
        *sources, dest = shlex.split(arg)
        assert not any(s.startswith("--") for s in sources), "build stage copies from the repo"
        for source in sources:
            to = workdir / dest.removeprefix(target).lstrip("/")
            to = to / Path(source).name if dest.endswith("/") else to
            if (ROOT / source).is_dir():
                shutil.copytree(
                    ROOT / source, to, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                )
            else:
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / source, to)
    image_venv = re.search(r"python -m venv (\S+)", " ".join(build.args("RUN")))
    assert image_venv, "the build stage creates a venv"
    for run in build.args("RUN"):
        for command in run.split("&&"):
            argv = shlex.split(command.replace(image_venv.group(1), str(venv)))
            # Keep pip's cache: the image does not want one, a test run does.
            argv = [a for a in argv if a != "--no-cache-dir"]
            if argv[:3] == ["python", "-m", "venv"]:
                argv[0] = sys.executable
            subprocess.run(
                argv,
                cwd=workdir,
                check=True,
                timeout=INSTALL_TIMEOUT_S,
                capture_output=True,
                env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
            )


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return int(resp.status), resp.read()


@pytest.mark.slow
def test_image_build_steps_give_a_working_service(stages: list[Stage], tmp_path: Path) -> None:
    build, runtime = stages[0], stages[-1]
    workdir, venv = tmp_path / "src", tmp_path / "opt-deploybot"
    workdir.mkdir()
    _replay_build(build, workdir, venv)
    assert not (venv / "bin" / "deploybot").is_symlink()
    # Not editable: the package must come from site-packages, migrations included.
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import bot, bot.migrations; print(bot.__file__)"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "site-packages" in where

    app, data = tmp_path / "app", tmp_path / "data"
    # The runtime stage's own COPY of the rules (the image ships the examples).
    [(source, target)] = [
        (parts[-2], parts[-1])
        for parts in map(shlex.split, runtime.args("COPY"))
        if "--from=build" not in parts
    ]
    assert (source, target) == ("rules", env_of(runtime)["DEPLOYBOT_RULES_DIR"])
    shutil.copytree(ROOT / source, app / "rules")
    data.mkdir()
    port = _free_port()
    env = {
        **{k: v for k, v in env_of(runtime).items() if not k.startswith("DEPLOYBOT_")},
        "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
        "DEPLOYBOT_DATABASE_URL": f"sqlite+aiosqlite:///{data / 'deploybot.db'}",
        "DEPLOYBOT_RULES_DIR": str(app / "rules"),
        "DEPLOYBOT_HOST": "127.0.0.1",
        "DEPLOYBOT_PORT": str(port),
    }
    cmd = json.loads(runtime.args("CMD")[0])
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [venv / "bin" / cmd[0], *cmd[1:]], cwd=app, env=env, stderr=log, stdout=log
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                status, body = _get(f"http://127.0.0.1:{port}/healthz")
                break
            except OSError:
                assert time.monotonic() < deadline, "deploybot serve did not come up"
                time.sleep(0.1)
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        status, body = _get(f"http://127.0.0.1:{port}/readyz")
        assert status == 200, body  # migrations ran and the example rules loaded
        # The image's HEALTHCHECK command itself, pointed at this port.
        check = runtime.args("HEALTHCHECK")[0].split(" CMD ", 1)[1].replace("8080", str(port))
        assert subprocess.run(["sh", "-c", check], env=env, timeout=10).returncode == 0
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    assert (data / "deploybot.db").is_file()
