"""Run one action of a rule: route it to its service client, look before creating.

An action either finishes (`Done`) or asks to be called again later (`Wait`) with a
small JSON-able state; the executor persists that state and calls `ActionRunner.run`
again when `after_s` has passed, so a long build never holds a worker.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bot.core.apis import registry
from bot.core.catalog import (
    Operation,
    Param,
    check_params,
    find_existing,
    lookup_params,
    mismatches,
)
from bot.errors import ActionError, ServiceDisabled
from bot.services import genesys, jira, outbound, ubiops
from bot.services.actions import (
    PATH_LOCATIONS,
    ActionResult,
    Done,
    HighLevelAction,
    RunInfo,
    ServiceClient,
    TenantClients,
)


@functools.cache
def high_level_actions() -> Mapping[str, HighLevelAction]:
    """Every adapter's `ACTIONS` table, keyed by `service.action`."""
    return {
        action.full_name: action
        for module in (ubiops, genesys, jira, outbound)
        for action in module.ACTIONS
    }


def action_registry() -> dict[str, Operation | HighLevelAction]:
    """Every action a rule can name, with the services' own (the dry run's previews)."""
    return {**registry(), **high_level_actions()}


def action_params(action_name: str) -> tuple[Param, ...] | None:
    """Return the parameters an action accepts (operation or high-level), None if unknown."""
    action = high_level_actions().get(action_name)
    if action is not None:
        return action.params
    op = registry().get(action_name)
    return None if op is None else op.params


def is_duplicate(exc: ActionError) -> bool:
    """Say whether a failed create means "it exists already" (409, or a 400 saying so)."""
    text = str(exc).lower()
    return exc.status == 409 or (exc.status == 400 and "already exist" in text)


def inside_folder(folder: Path, value: str, what: str) -> str:
    """Return `value` (relative to `folder`) resolved through its links, if it stays inside.

    A rendered path may hold Jira text: `../../.env`, an absolute path, or a link in the
    folder pointing out must not choose which file is read or written.
    """
    root = os.path.realpath(folder)
    resolved = "" if "\x00" in value else os.path.realpath(os.path.join(root, value))
    if not resolved or resolved == root or os.path.commonpath([root, resolved]) != root:
        raise ActionError(f"{what} is outside the rules folder {str(folder)!r}; not used")
    return resolved


class ActionRunner:
    """Route actions to service clients; a missing client means the service is disabled."""

    def __init__(
        self,
        clients: Mapping[str, ServiceClient | None],
        *,
        files_dir: str | Path | None = None,
        per_tenant: Mapping[str, TenantClients] | None = None,
    ) -> None:
        self._clients = dict(clients)
        self._per_tenant = dict(per_tenant or {})
        self._files_dir = Path(files_dir) if files_dir is not None else None

    async def run(
        self,
        action_name: str,
        params: Mapping[str, Any],
        *,
        state: dict[str, Any] | None = None,
        lookup_first: bool = False,
        tenant: str = "",
        key: str = "",
    ) -> ActionResult:
        """Run (or resume, with `state`) one action; raise ActionError when it fails.

        `tenant` is the Jira tenant of the event the action reacts to: a `jira.*` action
        calls that tenant's Jira. `key` is the run's idempotency key.
        """
        service = action_name.partition(".")[0]
        action = high_level_actions().get(action_name)
        op = None if action is not None else registry().get(action_name)
        if action is None and op is None:
            raise ActionError(f"unknown action {action_name}")
        client = self._clients.get(service)
        if client is None and service in self._per_tenant:
            client = await self._per_tenant[service].client(tenant)
            if client is None:
                raise ServiceDisabled(
                    f"{action_name}: no {service} client for tenant {tenant!r} (Connect: not"
                    " installed, or disabled; OAuth: settings incomplete, or not the app's site)"
                )
        if client is None:
            raise ServiceDisabled(f"{action_name}: service {service} is not configured")
        if action is not None:
            check_params(action.full_name, action.params, params)
            resolved = self._resolve_paths(action.params, params)
            return await action.run(client, resolved, state, RunInfo(key, lookup_first))
        assert op is not None
        resolved = self._resolve_paths(op.params, params)
        return Done(await self._call(client, op, resolved, lookup_first=lookup_first))

    def _resolve_paths(self, spec: tuple[Param, ...], params: Mapping[str, Any]) -> dict[str, Any]:
        """Resolve file parameters against the rules folder; refuse one that leaves it."""
        out = dict(params)
        if self._files_dir is None:
            return out
        for p in spec:
            value = out.get(p.name)
            if p.location in PATH_LOCATIONS and isinstance(value, str):  # "" is the folder
                out[p.name] = inside_folder(self._files_dir, value, f"{p.name} {value!r}")
        return out

    async def _call(
        self,
        client: ServiceClient,
        op: Operation,
        params: Mapping[str, Any],
        *,
        lookup_first: bool,
    ) -> Any:
        """Call an operation; for a create, look before creating and accept "exists"."""
        if op.creates is not None and lookup_first:
            existing = await self._existing(client, op, params)
            if existing is not None:
                return existing
        try:
            return await client.call(op.name, params)
        except ActionError as exc:
            # "exists already", or no answer: either way the object may be there now.
            if op.creates is None or not (is_duplicate(exc) or exc.retryable):
                raise
            try:
                existing = await self._existing(client, op, params)
            except ActionError as lookup_failed:
                if lookup_failed.retryable:
                    raise exc from None  # the create's failure is the one to report
                raise
            if existing is None:
                raise
            return existing

    async def _existing(
        self, client: ServiceClient, op: Operation, params: Mapping[str, Any]
    ) -> Any:
        """Find the object a create would make; refuse one that differs from the request."""
        assert op.creates is not None
        lookup = lookup_params(op, params)
        if lookup is None:
            return None  # the key is not in the params: nothing to look for
        try:
            found = await client.call(op.creates.lookup, lookup)
        except ActionError as exc:
            if exc.status == 404:
                return None
            raise
        existing = find_existing(op, params, found)
        if existing is None:
            return None
        differing = mismatches(op, params, existing)
        if differing:
            raise ActionError(
                f"{op.full_name}: the object exists already but differs in "
                f"{', '.join(differing)}; not changing it"
            )
        return existing
