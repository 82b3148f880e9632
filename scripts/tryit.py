"""The README's "try it" helpers (run through `python3 dev.py fake-ubiops|send`).

    fake-ubiops [--port 8090]   serve the tests' fake UbiOps (in memory), with project
                                ml-prod and deployment churn-model, builds that succeed
    send FILE [--url URL]       wait until deploybot is ready, deliver FILE signed as Jira
                                does (JIRA_CLIENT_SECRET), then wait for the event's outcome
                                (with DEPLOYBOT_ADMIN_TOKEN) and print it

Development aids only: nothing here is part of the service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests' fakes

DEFAULT_TOKEN = "try-it-ubiops-token"
FINAL_OUTCOMES = ("ignored", "succeeded", "failed")


async def fake_ubiops(port: int) -> None:
    import aiohttp
    from aiohttp import web

    from bot.services.ubiops import UbiOpsClient
    from tests.fakes.ubiops import FakeUbiOps

    class QuickBuilds(FakeUbiOps):
        """Builds succeed at the first look: the example rule's 30 s checks are not
        waited for (the tests' fake answers a look before the build moves on)."""

        async def revisions_get(self, request: web.Request) -> web.Response:
            version, revision = self._revision(request)
            self._advance(version, revision)
            return web.json_response(self._revision_json(revision))

    token = os.environ.get("UBIOPS_API_TOKEN", DEFAULT_TOKEN)
    fake = QuickBuilds(token=token, build_steps=("queued", "success"))
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base_url = f"http://127.0.0.1:{port}{fake.prefix}"
    async with aiohttp.ClientSession() as session:
        data = {"name": "churn-model", "input_type": "structured", "output_type": "structured"}
        await UbiOpsClient(session, base_url, token).call(
            "deployments_create", {"project_name": "ml-prod", "data": data}
        )
    print(f"fake UbiOps at {base_url}: project ml-prod, deployment churn-model", flush=True)
    await asyncio.Event().wait()  # until interrupted


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return int(answer.status), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(url: str, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if _get(f"{url}/readyz")[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"send: deploybot did not answer {url}/readyz within {wait_s:.0f} s")
        time.sleep(0.3)


def send(path: Path, url: str, wait_s: float) -> int:
    import jwt

    secret = os.environ.get("JIRA_CLIENT_SECRET")
    if not secret:
        sys.exit("send: set JIRA_CLIENT_SECRET (the same value deploybot runs with)")
    wait_ready(url, wait_s)
    token = jwt.encode({"exp": int(time.time()) + 60}, secret, "HS256")
    request = urllib.request.Request(
        f"{url}/webhooks/jira",
        data=path.read_bytes(),
        method="POST",
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "X-Atlassian-Webhook-Identifier": f"try-it-{uuid.uuid4()}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            status, body = int(answer.status), answer.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    print(f"delivered {path.name}: HTTP {status} {body.decode(errors='replace')}", flush=True)
    if status != 202:
        return 1
    admin = os.environ.get("DEPLOYBOT_ADMIN_TOKEN")
    if not admin:
        return 0
    event_id = json.loads(body)["event_id"]
    event = wait_outcome(url, admin, event_id, wait_s)
    print(f"event {event_id}: outcome {event.get('outcome')}")
    for run in event.get("action_runs", []):
        step = run["step"]  # on_failure steps are stored from 1000 on
        label = f"on_failure {step - 999}" if step >= 1000 else f"step {step + 1}"
        print(f"  {run['rule']} {label} {run['action']}: {run['status']}")
    print(f"see {url}/events/{event_id} (log in with DEPLOYBOT_ADMIN_TOKEN)")
    return 0 if event.get("outcome") in FINAL_OUTCOMES else 1


def wait_outcome(url: str, admin: str, event_id: int, wait_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + wait_s
    while True:
        status, body = _get(f"{url}/api/events/{event_id}", {"Authorization": f"Bearer {admin}"})
        event: dict[str, Any] = json.loads(body) if status == 200 else {}
        if event.get("outcome") in FINAL_OUTCOMES or time.monotonic() > deadline:
            return event
        time.sleep(0.3)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dev.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fake = commands.add_parser("fake-ubiops", help="serve a fake UbiOps")
    fake.add_argument("--port", type=int, default=8090)
    deliver = commands.add_parser("send", help="deliver a Jira payload, signed")
    deliver.add_argument("file", type=Path)
    deliver.add_argument("--url", default="http://127.0.0.1:8080")
    deliver.add_argument("--wait", type=float, default=60.0, help="seconds to wait (ready, done)")
    args = parser.parse_args(argv)
    if args.command == "fake-ubiops":
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C: a quiet stop
            asyncio.run(fake_ubiops(args.port))
        return 0
    return send(args.file, args.url.rstrip("/"), args.wait)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
