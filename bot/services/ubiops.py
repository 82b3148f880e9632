"""UbiOps deployments API: the operation table, the client, and `ubiops.deploy_revision`.

Operation names and parameters are those of the UbiOps deployments API reference
(`Deployments.md`, 31 methods); the client sends them through the shared policy in
`bot.services.http`.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Mapping
from typing import Any

import aiohttp

from bot.core.apis.ubiops import DEPLOY_REVISION_PARAMS, OPERATIONS_BY_NAME, SERVICE
from bot.core.backoff import RetryPolicy
from bot.core.catalog import PlannedRequest
from bot.errors import ActionError
from bot.services.actions import ActionResult, Done, HighLevelAction, RunInfo, ServiceClient, Wait
from bot.services.http import OperationClient, RateLimiter, Response, Sleep

DEFAULT_BASE_URL = "https://api.ubiops.com/v2.1"
DEFAULT_PER_MINUTE = 240  # stay under the account quota; 429s are handled on top


def authorization(token: str) -> str:
    """Return the Authorization header value; accept a token pasted with its "Token " prefix."""
    token = token.strip()
    return token if token.lower().startswith("token ") else f"Token {token}"


def _filename(headers: Mapping[str, str]) -> str | None:
    match = re.search(r'filename="?([^";]+)"?', headers.get("Content-Disposition", ""))
    return match.group(1) if match else None


class UbiOpsClient(OperationClient):
    """Typed client of the UbiOps deployments API; every call goes through `http.send`."""

    service = SERVICE
    operations = OPERATIONS_BY_NAME

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str = DEFAULT_BASE_URL,
        token: str = "",
        *,
        policy: RetryPolicy | None = None,
        per_minute: int = DEFAULT_PER_MINUTE,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(
            session,
            base_url,
            policy=policy or RetryPolicy(),
            limiter=RateLimiter(per_minute),
            sleep=sleep,
            rng=rng or random.Random(),
        )
        self._auth = {"Authorization": authorization(token), "Accept": "application/json"}

    async def _headers(self, req: PlannedRequest, sent: list[str]) -> Mapping[str, str]:
        return self._auth

    def _answer(self, req: PlannedRequest, response: Response) -> Any:
        if req.download_path is not None:
            # a step result is stored as JSON: describe the file, never return its bytes
            return {
                "filename": _filename(response.headers),
                "size_bytes": response.downloaded_bytes or len(response.body),
                "path": req.download_path,
            }
        return response.json


# Revision build states (UbiOps): the last two are final.
BUILD_IN_PROGRESS = frozenset({"queued", "building", "deploying", "validating"})
POLL_DELAYS_S = (2.0, 5.0, 10.0, 15.0, 30.0)  # then every 30 s
MAX_POLLS = 240  # about two hours of building before giving up


def poll_delay_s(polls: int) -> float:
    """Return the wait before status check number `polls + 1`."""
    return POLL_DELAYS_S[min(polls, len(POLL_DELAYS_S) - 1)]


async def deploy_revision(
    client: ServiceClient, params: Mapping[str, Any], state: dict[str, Any] | None, _run: RunInfo
) -> ActionResult:
    """Upload a deployment file, then follow its revision until the build is final.

    A revision has no natural key to look up, so a retry after an unknown outcome
    uploads again: UbiOps then builds the same file once more and the newest
    revision becomes active, which leaves the version as intended.
    """
    where = {k: params[k] for k in ("project_name", "deployment_name", "version")}
    if state is None:
        upload = await client.call("revisions_file_upload", {**where, "file": params["file"]})
        revision_id = upload["revision"]
        return Wait(poll_delay_s(0), {"revision": revision_id, "polls": 0, "status": "queued"})
    revision_id = state["revision"]
    revision = await client.call("revisions_get", {**where, "revision_id": revision_id})
    status = revision.get("status")
    if status == "success":
        return Done({"revision": revision_id, "status": status, **where})
    label = f"revision {revision_id} of {where['deployment_name']}/{where['version']}"
    if status not in BUILD_IN_PROGRESS:
        detail = revision.get("error_message") or "no error message"
        raise ActionError(f"{label}: build {status}: {detail}")
    polls = int(state.get("polls", 0)) + 1
    if polls >= MAX_POLLS:
        raise ActionError(f"{label}: still {status} after {polls} status checks; giving up")
    return Wait(poll_delay_s(polls), {"revision": revision_id, "polls": polls, "status": status})


ACTIONS: tuple[HighLevelAction, ...] = (
    HighLevelAction(SERVICE, "deploy_revision", DEPLOY_REVISION_PARAMS, deploy_revision),
)
