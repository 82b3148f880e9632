"""Declarative description of every external operation a rule can call.

The tables live in the adapter modules (`ubiops`, `genesys`, `jira`); this module
holds the types, the one registry the rule checker, the dry run and the executor
read, and the pure planner that turns an operation and its parameters into the
exact HTTP call. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlencode

from bot.errors import ActionError

# "form": a multipart form field sent beside the file; "download": a local path the
# response body is saved to (deploybot's own, e.g. ubiops.revisions_file_download).
ParamLocation = Literal["path", "query", "header", "body", "file", "form", "download"]


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter of an operation as named in the service's API reference."""

    name: str
    location: ParamLocation
    required: bool = False
    wire_name: str = ""  # name on the wire (path placeholder or query key); defaults to name
    many: bool = False  # a query list (`expand`): sent comma-separated, as the SDKs send it

    @property
    def wire(self) -> str:
        return self.wire_name or self.name


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
JSON = "application/json"
MULTIPART = "multipart/form-data"


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """The exact HTTP call an action would make (dry run and executor share it)."""

    method: str
    path: str  # relative to the service base URL, already filled in and quoted
    query: tuple[tuple[str, str], ...] = ()
    json_body: Any = None
    file_path: str | None = None  # multipart upload, field "file"
    form: tuple[tuple[str, str], ...] = ()  # multipart fields sent beside (or instead of) the file
    download_path: str | None = None  # save the response body to this local file
    headers: tuple[tuple[str, str], ...] = ()  # request headers from `header` params
    follow_redirects: bool = True  # http.request: a redirect could leave the allowed hosts
    # False for the operations the official client sends without credentials (Genesys
    # guest operations): the service's token is not sent with them.
    authorized: bool = True
    # What a body method without a body sends: nothing (UbiOps' client) or `null`
    # (Genesys' client serialises the absent body); either way as application/json.
    empty_json: bytes = b""

    @property
    def multipart(self) -> bool:
        return self.file_path is not None or bool(self.form)

    @property
    def content_type(self) -> str | None:
        """The request's Content-Type: multipart for uploads (a file or form fields only,
        as the client sends them), JSON for every other body method, none without a body."""
        if self.multipart:
            return MULTIPART
        if self.json_body is not None or self.method in BODY_METHODS:
            return JSON
        return None

    @property
    def query_string(self) -> str:
        """The query as sent: every reserved character percent-encoded, as both official
        clients encode it (`urlencode`), not left raw as aiohttp/yarl would."""
        return urlencode(self.query)

    @property
    def repeatable(self) -> bool:
        """Whether sending it twice does what sending it once does (RFC 9110 idempotent
        methods). A POST whose answer was lost may have created something already."""
        return self.method in IDEMPOTENT_METHODS


@dataclass(frozen=True, slots=True)
class CreateSpec:
    """How to find the object a create operation would make, to look before creating.

    `lookup` is an operation of the same service (a get or a list). `params` maps each
    lookup parameter to a dotted path into the create parameters (`"data.version"`).
    For a list lookup, `match` pairs an item field with a dotted path into the create
    parameters (None: the field must be null); the item whose fields all equal those
    values is the existing object.
    `compare` names body fields that must equal the existing object's for it to count
    as the object we meant to create (fields absent from the body are not compared).
    """

    lookup: str
    params: tuple[tuple[str, str], ...]
    match: tuple[tuple[str, str | None], ...] = ()
    compare: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation of an external API, e.g. ubiops.deployment_versions_create."""

    service: str
    name: str
    method: str
    path: str  # template with {wire_name} placeholders
    params: tuple[Param, ...] = field(default=())
    creates: CreateSpec | None = None  # set on creates: how to look the object up first
    authorized: bool = True  # False: sent without the service's credentials (guest calls)
    empty_json: bytes = b""  # the body of a body method called without one (see PlannedRequest)
    # Groups of parameters of which exactly one must be given, each group whole
    # (ubiops.revisions_file_upload: a file, or source_deployment with source_version).
    one_of: tuple[tuple[str, ...], ...] = ()

    @property
    def full_name(self) -> str:
        return f"{self.service}.{self.name}"

    @property
    def param_names(self) -> frozenset[str]:
        return frozenset(p.name for p in self.params)

    @property
    def required_params(self) -> frozenset[str]:
        return frozenset(p.name for p in self.params if p.required)


def build_registry(tables: Mapping[str, tuple[Operation, ...]]) -> dict[str, Operation]:
    """Key every operation of the given tables by `service.operation`; refuse duplicates."""
    ops: dict[str, Operation] = {}
    for table in tables.values():
        for op in table:
            if op.full_name in ops:
                raise ValueError(f"operation {op.full_name} is defined twice")
            ops[op.full_name] = op
    return ops


def _query_value(value: Any) -> str:
    """Render one query value the way the services expect (booleans in lower case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _query_param(full_name: str, param: Param, value: Any) -> str:
    """Render a query parameter; a list (for a `many` parameter) joins with commas."""
    if isinstance(value, list | tuple):
        if not param.many:
            raise ActionError(f"{full_name}: {param.name} takes a single value, not a list")
        if any(isinstance(v, list | tuple | Mapping) for v in value):
            raise ActionError(f"{full_name}: {param.name} takes a list of plain values")
        return ",".join(_query_value(v) for v in value if v is not None)
    if isinstance(value, Mapping):
        raise ActionError(f"{full_name}: {param.name} takes a single value, not a mapping")
    return _query_value(value)


def check_params(full_name: str, spec: tuple[Param, ...], params: Mapping[str, Any]) -> None:
    """Refuse unknown parameters and missing required ones with a clear, final error."""
    names = {p.name for p in spec}
    unknown = sorted(set(params) - names)
    if unknown:
        allowed = ", ".join(sorted(names)) or "none"
        raise ActionError(
            f"{full_name}: unknown parameter(s) {', '.join(unknown)} (allowed: {allowed})"
        )
    missing = sorted(p.name for p in spec if p.required and params.get(p.name) is None)
    if missing:
        raise ActionError(f"{full_name}: missing required parameter(s) {', '.join(missing)}")


# Segments a URL library (yarl, a server's router) removes or merges: `..` climbs to the
# parent resource (DELETE .../versions/.. deletes the deployment), `.` and "" vanish.
_NORMALISED_AWAY = frozenset({"", ".", ".."})


def path_segment(full_name: str, name: str, value: Any) -> str:
    """Quote a rendered path parameter as one segment; refuse one that would not stay one."""
    text = str(value)
    if text.strip() in _NORMALISED_AWAY:
        raise ActionError(
            f"{full_name}: path parameter {name} is {text!r}, which would change the"
            " address (an empty, '.' or '..' path segment is never sent)"
        )
    # safe="" so a "/" inside a name cannot change which resource is addressed either
    return quote(text, safe="")


def one_of_problem(
    full_name: str, groups: tuple[tuple[str, ...], ...], given: frozenset[str]
) -> str | None:
    """Say what is wrong with the given parameter names against `one_of` groups, if anything."""
    if not groups:
        return None
    listed = " or ".join(" with ".join(group) for group in groups)
    for group in groups:
        present = [name for name in group if name in given]
        if present and len(present) != len(group):
            missing = ", ".join(name for name in group if name not in given)
            return f"{full_name}: {', '.join(present)} needs {missing} too"
    complete = [group for group in groups if all(name in given for name in group)]
    if not complete:
        return f"{full_name} needs {listed}"
    if len(complete) > 1:
        given_groups = "; ".join(" with ".join(group) for group in complete)
        return f"{full_name} takes only one of {listed} (given: {given_groups})"
    return None


def plan_request(op: Operation, params: Mapping[str, Any]) -> PlannedRequest:
    """Turn an operation and its named parameters into the exact HTTP request."""
    check_params(op.full_name, op.params, params)
    given = frozenset(name for name, value in params.items() if value is not None)
    if (problem := one_of_problem(op.full_name, op.one_of, given)) is not None:
        raise ActionError(problem)
    path_values: dict[str, str] = {}
    query: list[tuple[str, str]] = []
    json_body: Any = None
    file_path: str | None = None
    download_path: str | None = None
    form: list[tuple[str, str]] = []
    headers: list[tuple[str, str]] = []
    for p in op.params:
        value = params.get(p.name)
        if value is None:
            continue
        if p.location == "path":
            path_values[p.wire] = path_segment(op.full_name, p.name, value)
        elif p.location == "query":
            query.append((p.wire, _query_param(op.full_name, p, value)))
        elif p.location == "body":
            json_body = value
        elif p.location == "form":
            form.append((p.wire, _query_value(value)))
        elif p.location == "header":
            headers.append((p.wire, _query_value(value)))
        elif p.location == "download":
            download_path = str(value)
        else:
            file_path = str(value)
    return PlannedRequest(
        method=op.method,
        path=op.path.format_map(path_values),
        query=tuple(query),
        json_body=json_body,
        file_path=file_path,
        form=tuple(form),
        download_path=download_path,
        headers=tuple(headers),
        authorized=op.authorized,
        empty_json=op.empty_json,
    )


def dig(params: Mapping[str, Any], dotted: str) -> Any:
    """Return the value at a dotted path (`data.version`) in the params, or None."""
    value: Any = params
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def lookup_params(op: Operation, params: Mapping[str, Any]) -> dict[str, Any] | None:
    """Return the lookup operation's params for a create, or None if they cannot be known."""
    spec = op.creates
    if spec is None:
        return None
    out = {name: dig(params, source) for name, source in spec.params}
    return None if any(v is None for v in out.values()) else out


def find_existing(op: Operation, params: Mapping[str, Any], found: Any) -> Any:
    """Pick the object a create would have made out of the lookup's answer (None if absent)."""
    spec = op.creates
    if spec is None or found is None:
        return None
    if not spec.match:
        return found
    if isinstance(found, Mapping) and isinstance(found.get("entities"), list):
        found = found["entities"]  # Genesys listings: {"entities": [...], "pageSize": ...}
    if not isinstance(found, list):
        return None
    for item in found:
        if isinstance(item, Mapping) and all(
            item.get(field_name) == (None if source is None else dig(params, source))
            for field_name, source in spec.match
        ):
            return item
    return None


def mismatches(op: Operation, params: Mapping[str, Any], existing: Any) -> list[str]:
    """List the compared fields where an existing object differs from what the create asked."""
    spec = op.creates
    if spec is None or not isinstance(existing, Mapping):
        return []
    body_param = next((p.name for p in op.params if p.location == "body"), None)
    body = params.get(body_param) if body_param else None
    if not isinstance(body, Mapping):
        return []
    # A field the service does not echo (None, e.g. a secret's value) cannot be compared.
    return [
        f
        for f in spec.compare
        if f in body and existing.get(f) is not None and existing.get(f) != body[f]
    ]
