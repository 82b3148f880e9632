"""Jira's REST API as data: the dynamic-webhook operations (`docs/reference/jira-webhooks-api.md`)
and the parameters of deploybot's write-back actions (`jira.add_comment`, ...)."""

from __future__ import annotations

from collections.abc import Mapping

from bot.core.catalog import Operation, Param

SERVICE = "jira"
_HOOKS = "/rest/api/3/webhook"


def _body_param(name: str) -> tuple[Param, ...]:
    return (Param(name, "body", required=True),)


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        SERVICE, "delete_webhook_by_id", "DELETE", _HOOKS, _body_param("container_for_webhook_ids")
    ),
    Operation(
        SERVICE,
        "get_dynamic_webhooks_for_app",
        "GET",
        _HOOKS,
        (
            Param("start_at", "query", wire_name="startAt"),
            Param("max_results", "query", wire_name="maxResults"),
        ),
    ),
    Operation(
        SERVICE,
        "get_failed_webhooks",
        "GET",
        _HOOKS + "/failed",
        (Param("max_results", "query", wire_name="maxResults"), Param("after", "query")),
    ),
    Operation(
        SERVICE,
        "refresh_webhooks",
        "PUT",
        _HOOKS + "/refresh",
        _body_param("container_for_webhook_ids"),
    ),
    Operation(
        SERVICE,
        "register_dynamic_webhooks",
        "POST",
        _HOOKS,
        _body_param("webhook_registration_details"),
    ),
)
OPERATIONS_BY_NAME: Mapping[str, Operation] = {op.name: op for op in OPERATIONS}


ACTION_PARAMS: Mapping[str, tuple[Param, ...]] = {
    "add_comment": (
        Param("issue", "path", required=True),
        Param("body", "body"),
        Param("adf", "body"),
        Param("visibility", "body"),
    ),
    "transition_issue": (
        Param("issue", "path", required=True),
        Param("transition", "body", required=True),
        Param("fields", "body"),
        Param("update", "body"),
        Param("comment", "body"),
    ),
    "edit_issue": (
        Param("issue", "path", required=True),
        Param("fields", "body"),
        Param("update", "body"),
        Param("notify_users", "query"),
    ),
    "get_issue": (
        Param("issue", "path", required=True),
        Param("fields", "body"),
        Param("expand", "body"),
    ),
    "search_issues": (
        Param("jql", "query", required=True),
        Param("fields", "body"),
        Param("max_results", "query"),
    ),
}
