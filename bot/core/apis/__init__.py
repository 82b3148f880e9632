"""Each external API as data: operation tables and action parameters (no I/O).

The rule checker, the dry run and the adapters all read these tables: one definition of
every operation a rule can call.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

from bot.core.apis import genesys, http, jira, ubiops
from bot.core.catalog import Operation, Param, build_registry


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """What the rule checker knows of a high-level action: its name and parameters."""

    service: str
    name: str
    params: tuple[Param, ...]

    @property
    def full_name(self) -> str:
        return f"{self.service}.{self.name}"


@functools.cache
def registry() -> Mapping[str, Operation]:
    """Every operation of every service, keyed by `service.operation`."""
    return build_registry({m.SERVICE: tuple(m.OPERATIONS) for m in (ubiops, genesys, jira, http)})


@functools.cache
def action_specs() -> Mapping[str, ActionSpec]:
    """deploybot's own actions (made of several calls), keyed by `service.action`."""
    specs = [
        ActionSpec(ubiops.SERVICE, "deploy_revision", ubiops.DEPLOY_REVISION_PARAMS),
        ActionSpec(genesys.SERVICE, "publish_configuration", genesys.PUBLISH_PARAMS),
        ActionSpec(http.SERVICE, "request", http.PARAMS),
        *(ActionSpec(jira.SERVICE, name, params) for name, params in jira.ACTION_PARAMS.items()),
    ]
    return {spec.full_name: spec for spec in specs}
