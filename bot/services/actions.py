"""What an action is and what it answers: the types the adapters and the runner share.

An action either finishes (`Done`) or asks to be called again later (`Wait`) with a
small JSON-able state (`bot.services.runner` runs them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from bot.core.catalog import Param, PlannedRequest

# Parameters holding a local file path; a relative one is resolved against files_dir.
PATH_LOCATIONS = frozenset({"file", "download"})


@dataclass(frozen=True, slots=True)
class Done:
    """The action finished; `result` is what later steps read as `steps.<id>`."""

    result: Any


@dataclass(frozen=True, slots=True)
class Wait:
    """The action is under way; call `run` again after `after_s` with this `state`."""

    after_s: float
    state: dict[str, Any] = field(default_factory=dict)


ActionResult = Done | Wait


class ServiceClient(Protocol):
    """What the runner needs of a service adapter (UbiOpsClient, GenesysClient, ...)."""

    async def call(self, op_name: str, params: Mapping[str, Any]) -> Any:
        """Call one operation of the service's table with its named parameters."""
        ...


class TenantClients(Protocol):
    """A service reached as the event's Jira tenant: each Connect site is its own client."""

    async def client(self, tenant: str) -> ServiceClient | None:
        """The tenant's client, or None when the tenant cannot be reached (unknown,
        disabled, or not reachable in this auth mode)."""
        ...


@dataclass(frozen=True, slots=True)
class RunInfo:
    """Which action run is running: keyed actions mark what they make with `key` and look
    for it first when `lookup_first` (an earlier attempt's outcome is unknown)."""

    key: str = ""
    lookup_first: bool = False


# An action's code: its client, rendered parameters, its saved state (None at first), and
# which run it is (actions that mark what they make, e.g. a comment, use its key).
ActionFn = Callable[
    [ServiceClient, Mapping[str, Any], dict[str, Any] | None, RunInfo], Awaitable[ActionResult]
]


# The main call an action would make with these parameters, for the dry run.
PreviewFn = Callable[[Mapping[str, Any]], PlannedRequest]


@dataclass(frozen=True, slots=True)
class HighLevelAction:
    """deploybot's own action (e.g. ubiops.deploy_revision, jira.add_comment): several calls,
    resumable by state."""

    service: str
    name: str
    params: tuple[Param, ...]
    run: ActionFn
    preview: PreviewFn | None = None

    @property
    def full_name(self) -> str:
        return f"{self.service}.{self.name}"
