"""The README works as written: its "try it" block, pasted into a shell, starts deploybot
and a fake UbiOps and shows an action run; its table of contents points at its headings;
the commands it names exist."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from bot.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TRY_IT_PORTS = (8080, 8090)


def try_it_block() -> str:
    """The shell block between the README's try-it markers, as written."""
    found = re.search(r"<!-- try-it[^>]*-->\n```sh\n(.*?)```\n<!-- /try-it -->", README, re.S)
    assert found, "README.md has no try-it block between its markers"
    return found.group(1)


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _isolated_network() -> list[str] | None:
    """A command prefix running in a network namespace of its own (its own 8080), when
    this machine allows one; None otherwise."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return None
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10)
    return ["unshare", "-rn"] if probe.returncode == 0 else None


def checkout_copy(where: Path) -> Path:
    """What a fresh clone with its set-up done has, in `where`: the venv shared (same
    pyproject.toml, so dev.py does not reinstall), the rest copied."""
    for name in ("dev.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, where / name)
    shutil.copytree(ROOT / "rules", where / "rules")
    shutil.copytree(ROOT / "tests" / "data", where / "tests" / "data")
    (where / ".venv").symlink_to(ROOT / ".venv")
    (where / "scripts").symlink_to(ROOT / "scripts")
    return where


@pytest.mark.slow
def test_try_it_block_runs_as_written(tmp_path: Path) -> None:
    block = try_it_block()
    prefix = _isolated_network()
    if prefix is None and not all(map(_free, TRY_IT_PORTS)):
        pytest.skip(f"ports {TRY_IT_PORTS} are in use and no network namespace is allowed")
    folder = checkout_copy(tmp_path)
    (folder / "try-it.sh").write_text("set -e\n" + block)
    command = (
        ["bash", "-c", "ip link set lo up && exec bash try-it.sh"]
        if prefix
        else [
            "bash",
            "try-it.sh",
        ]
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DEPLOYBOT_", "JIRA_", "UBIOPS_", "GENESYS_"))
    }
    proc = subprocess.Popen(
        [*(prefix or []), *command],
        cwd=folder,
        env={**env, "DEPLOYBOT_LOG_FORMAT": "json"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out + err
    assert 'HTTP 202 {"event_id": 1}' in out
    assert "event 1: outcome succeeded" in out
    assert "deploy-model-when-ready step 5 ubiops.deployments_update: succeeded" in out
    listed = out[out.index("see http://127.0.0.1:8080/events/1") :].splitlines()[1:]
    assert listed[0].split()[:3] == ["id", "status", "outcome"]
    assert "OPS-42" in listed[1] and "succeeded" in listed[1]
    assert (folder / "deploybot.db").is_file()  # the default database, in the folder


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_table_of_contents_points_at_headings() -> None:
    headings = re.findall(r"^#{2,3} (.+)$", README, re.M)
    anchors = {_slug(h) for h in headings}
    contents = README[README.index("## Contents") : README.index("## Set-up")]
    linked = re.findall(r"\]\(#([^)]+)\)", contents)
    assert len(linked) >= 20
    assert [a for a in linked if a not in anchors] == []
    every_link = set(re.findall(r"\]\(#([^)]+)\)", README))
    assert every_link <= anchors


def test_commands_named_in_the_readme_exist() -> None:
    parser = build_parser()
    named = set(re.findall(r"`deploybot ([a-z]+ [a-z]+)", README))
    assert {"rules test", "rules check", "actions list", "runs retry"} <= named
    for command in sorted(named):
        group, sub = command.split()
        if group == "db" and sub not in {"upgrade"}:
            continue
        parser.parse_args([group, sub, *_required(group, sub)])
    assert "rules dry-run" not in README and "dev.py test -rs" not in README


def _required(group: str, sub: str) -> list[str]:
    """Placeholder positional arguments for the commands that need them."""
    return {
        ("rules", "test"): ["event.json"],
        ("runs", "retry"): ["1"],
        ("events", "show"): ["1"],
    }.get((group, sub), [])
