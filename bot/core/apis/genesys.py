"""The Genesys Cloud web deployments and widgets APIs as data: their operations and
deploybot's own actions' parameters.

Operation names and parameters are the method names of the Genesys Cloud API reference
(`docs/reference/genesys-webdeployments-api.md`, `genesys-widgets-api.md`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from bot.core.catalog import CreateSpec, Operation, Param, ParamLocation

SERVICE = "genesys"

_WD = "/api/v2/webdeployments"
_WIDGETS = "/api/v2/widgets/deployments"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part.title() for part in rest)


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


# Header parameters of the reference: param name -> header name.
HEADER_NAMES: Mapping[str, str] = {
    "x_journey_session_id": "X-Journey-Session-Id",
    "x_journey_session_type": "X-Journey-Session-Type",
}


# Query parameters the reference types as `list[str]` (the SDK joins them with commas).
LIST_PARAMS = frozenset({"expand"})
# Operations the SDK sends without credentials (`auth_settings = []`): a web messaging
# guest's own token calls and cobrowse sessions. The org's token is not theirs to carry.
GUEST_OPERATIONS = frozenset(
    {
        "delete_webdeployments_deployment_cobrowse_session_id",
        "delete_webdeployments_token_revoke",
        "get_webdeployments_deployment_cobrowse_session_id",
        "post_webdeployments_token_oauthcodegrantjwtexchange",
        "post_webdeployments_token_refresh",
    }
)


def _op(
    method: str, path: str, name: str, *extra: str, creates: CreateSpec | None = None
) -> Operation:
    """Build one operation; path params come from the template, `extra` are `loc:name[!]`."""
    params = [Param(_snake(w), "path", True, w) for w in _PLACEHOLDER.findall(path)]
    for spec in extra:
        loc, _, rest = spec.partition(":")
        pname = rest.rstrip("!")
        location: ParamLocation = (
            "body" if loc == "body" else "header" if loc == "header" else "query"
        )
        wire = "" if location == "body" else HEADER_NAMES.get(pname) or _camel(pname)
        params.append(Param(pname, location, rest.endswith("!"), wire, many=pname in LIST_PARAMS))
    return Operation(
        SERVICE,
        name,
        method,
        path,
        tuple(params),
        creates,
        authorized=name not in GUEST_OPERATIONS,
        empty_json=b"null",  # the SDK sends json.dumps(None) for an absent body
    )


def _named(listing: str, body_param: str) -> CreateSpec:
    """Look a create up by its name in a listing (Genesys names these objects uniquely)."""
    return CreateSpec(listing, (), match=(("name", f"{body_param}.name"),))


OPERATIONS: tuple[Operation, ...] = (
    # WebDeploymentsApi (Python SDK), in the reference's order
    _op(
        "DELETE", f"{_WD}/configurations/{{configurationId}}", "delete_webdeployments_configuration"
    ),
    _op("DELETE", f"{_WD}/deployments/{{deploymentId}}", "delete_webdeployments_deployment"),
    _op(
        "DELETE",
        f"{_WD}/deployments/{{deploymentId}}/cobrowse/{{sessionId}}",
        "delete_webdeployments_deployment_cobrowse_session_id",
    ),
    _op(
        "DELETE",
        f"{_WD}/token/revoke",
        "delete_webdeployments_token_revoke",
        "header:x_journey_session_id",
        "header:x_journey_session_type",
    ),
    _op(
        "GET",
        f"{_WD}/configurations/{{configurationId}}/versions/{{versionId}}",
        "get_webdeployments_configuration_version",
    ),
    _op(
        "GET",
        f"{_WD}/configurations/{{configurationId}}/versions",
        "get_webdeployments_configuration_versions",
    ),
    _op(
        "GET",
        f"{_WD}/configurations/{{configurationId}}/versions/draft",
        "get_webdeployments_configuration_versions_draft",
    ),
    _op(
        "GET",
        f"{_WD}/configurations",
        "get_webdeployments_configurations",
        "query:show_only_published",
    ),
    _op(
        "GET",
        f"{_WD}/deployments/{{deploymentId}}",
        "get_webdeployments_deployment",
        "query:expand",
    ),
    _op(
        "GET",
        f"{_WD}/deployments/{{deploymentId}}/cobrowse/{{sessionId}}",
        "get_webdeployments_deployment_cobrowse_session_id",
    ),
    _op(
        "GET",
        f"{_WD}/deployments/{{deploymentId}}/configurations",
        "get_webdeployments_deployment_configurations",
        "query:type",
        "query:expand",
    ),
    _op("GET", f"{_WD}/deployments", "get_webdeployments_deployments", "query:expand"),
    _op(
        "POST",
        f"{_WD}/configurations/{{configurationId}}/versions/draft/publish",
        "post_webdeployments_configuration_versions_draft_publish",
    ),
    _op(
        "POST",
        f"{_WD}/configurations",
        "post_webdeployments_configurations",
        "body:configuration_version!",
        creates=_named("get_webdeployments_configurations", "configuration_version"),
    ),
    _op(
        "POST",
        f"{_WD}/deployments",
        "post_webdeployments_deployments",
        "body:deployment!",
        creates=_named("get_webdeployments_deployments", "deployment"),
    ),
    _op(
        "POST",
        f"{_WD}/token/oauthcodegrantjwtexchange",
        "post_webdeployments_token_oauthcodegrantjwtexchange",
        "body:body!",
    ),
    _op("POST", f"{_WD}/token/refresh", "post_webdeployments_token_refresh", "body:body"),
    _op(
        "PUT",
        f"{_WD}/configurations/{{configurationId}}/versions/draft",
        "put_webdeployments_configuration_versions_draft",
        "body:configuration_version!",
    ),
    _op(
        "PUT",
        f"{_WD}/deployments/{{deploymentId}}",
        "put_webdeployments_deployment",
        "body:deployment!",
    ),
    # WidgetsApi (deprecated by Genesys, still part of the contract); JS names in snake_case
    _op("DELETE", f"{_WIDGETS}/{{deploymentId}}", "delete_widgets_deployment"),
    _op("GET", f"{_WIDGETS}/{{deploymentId}}", "get_widgets_deployment"),
    _op("GET", _WIDGETS, "get_widgets_deployments"),
    _op(
        "POST",
        _WIDGETS,
        "post_widgets_deployments",
        "body:body!",
        creates=_named("get_widgets_deployments", "body"),
    ),
    _op("PUT", f"{_WIDGETS}/{{deploymentId}}", "put_widgets_deployment", "body:body!"),
)

OPERATIONS_BY_NAME: Mapping[str, Operation] = {op.name: op for op in OPERATIONS}

PUBLISH_ACTION = f"{SERVICE}.publish_configuration"
PUBLISH_PARAMS = (
    Param("configuration_id", "path", required=True),
    Param("body", "body"),
    Param("deployment_id", "path"),
)
