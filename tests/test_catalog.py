"""The operation catalog: registry, the UbiOps table against its reference, plan_request."""

from __future__ import annotations

from typing import Any

import pytest

from bot.core import apis
from bot.core.apis import registry, ubiops
from bot.core.catalog import (
    CreateSpec,
    Operation,
    Param,
    PlannedRequest,
    build_registry,
    find_existing,
    lookup_params,
    mismatches,
    plan_request,
)
from bot.errors import ActionError

DEPLOYMENTS = "/projects/{project_name}/deployments"

# (name, method, path after DEPLOYMENTS, required params, optional params), copied
# from the UbiOps deployments API reference (index table and method signatures).
REFERENCE: list[tuple[str, str, str, str, str]] = [
    (
        "builds_get",
        "GET",
        "/{deployment_name}/versions/{version}/builds/{build_id}",
        "project_name build_id deployment_name version",
        "",
    ),
    (
        "builds_list",
        "GET",
        "/{deployment_name}/versions/{version}/builds",
        "project_name deployment_name version",
        "",
    ),
    (
        "builds_update",
        "PATCH",
        "/{deployment_name}/versions/{version}/builds/{build_id}",
        "project_name build_id deployment_name version data",
        "",
    ),
    (
        "deployment_audit_events_list",
        "GET",
        "/{deployment_name}/audit",
        "project_name deployment_name",
        "action limit offset",
    ),
    (
        "deployment_environment_variables_copy",
        "POST",
        "/{deployment_name}/copy-environment-variables",
        "project_name deployment_name data",
        "",
    ),
    (
        "deployment_environment_variables_create",
        "POST",
        "/{deployment_name}/environment-variables",
        "project_name deployment_name data",
        "",
    ),
    (
        "deployment_environment_variables_delete",
        "DELETE",
        "/{deployment_name}/environment-variables/{id}",
        "project_name deployment_name id",
        "",
    ),
    (
        "deployment_environment_variables_get",
        "GET",
        "/{deployment_name}/environment-variables/{id}",
        "project_name deployment_name id",
        "",
    ),
    (
        "deployment_environment_variables_list",
        "GET",
        "/{deployment_name}/environment-variables",
        "project_name deployment_name",
        "",
    ),
    (
        "deployment_environment_variables_update",
        "PATCH",
        "/{deployment_name}/environment-variables/{id}",
        "project_name deployment_name id data",
        "",
    ),
    (
        "deployment_version_environment_variables_copy",
        "POST",
        "/{deployment_name}/versions/{version}/copy-environment-variables",
        "project_name deployment_name version data",
        "",
    ),
    (
        "deployment_version_environment_variables_create",
        "POST",
        "/{deployment_name}/versions/{version}/environment-variables",
        "project_name deployment_name version data",
        "",
    ),
    (
        "deployment_version_environment_variables_delete",
        "DELETE",
        "/{deployment_name}/versions/{version}/environment-variables/{id}",
        "project_name deployment_name id version",
        "",
    ),
    (
        "deployment_version_environment_variables_get",
        "GET",
        "/{deployment_name}/versions/{version}/environment-variables/{id}",
        "project_name deployment_name id version",
        "",
    ),
    (
        "deployment_version_environment_variables_list",
        "GET",
        "/{deployment_name}/versions/{version}/environment-variables",
        "project_name deployment_name version",
        "",
    ),
    (
        "deployment_version_environment_variables_update",
        "PATCH",
        "/{deployment_name}/versions/{version}/environment-variables/{id}",
        "project_name deployment_name id version data",
        "",
    ),
    (
        "deployment_versions_create",
        "POST",
        "/{deployment_name}/versions",
        "project_name deployment_name data",
        "",
    ),
    (
        "deployment_versions_delete",
        "DELETE",
        "/{deployment_name}/versions/{version}",
        "project_name deployment_name version",
        "",
    ),
    (
        "deployment_versions_get",
        "GET",
        "/{deployment_name}/versions/{version}",
        "project_name deployment_name version",
        "",
    ),
    (
        "deployment_versions_list",
        "GET",
        "/{deployment_name}/versions",
        "project_name deployment_name",
        "labels",
    ),
    (
        "deployment_versions_update",
        "PATCH",
        "/{deployment_name}/versions/{version}",
        "project_name deployment_name version data",
        "",
    ),
    ("deployments_create", "POST", "", "project_name data", ""),
    ("deployments_delete", "DELETE", "/{deployment_name}", "project_name deployment_name", ""),
    ("deployments_get", "GET", "/{deployment_name}", "project_name deployment_name", ""),
    ("deployments_list", "GET", "", "project_name", "labels"),
    ("deployments_update", "PATCH", "/{deployment_name}", "project_name deployment_name data", ""),
    (
        "revisions_file_download",
        "GET",
        "/{deployment_name}/versions/{version}/revisions/{revision_id}/download",
        "project_name deployment_name revision_id version",
        "",
    ),
    (
        "revisions_file_upload",
        "POST",
        "/{deployment_name}/versions/{version}/revisions",
        "project_name deployment_name version",
        "file source_deployment source_version template_deployment_id",
    ),
    (
        "revisions_get",
        "GET",
        "/{deployment_name}/versions/{version}/revisions/{revision_id}",
        "project_name deployment_name revision_id version",
        "",
    ),
    (
        "revisions_list",
        "GET",
        "/{deployment_name}/versions/{version}/revisions",
        "project_name deployment_name version",
        "",
    ),
    (
        "revisions_rebuild",
        "POST",
        "/{deployment_name}/versions/{version}/revisions/{revision_id}/rebuild",
        "project_name deployment_name revision_id version",
        "data",
    ),
]
# deploybot's own addition: where revisions_file_download stores the file.
EXTENSIONS = {"revisions_file_download": {"save_to"}}


def test_table_has_exactly_the_reference_operations() -> None:
    assert sorted(op.name for op in ubiops.DEPLOYMENT_OPERATIONS) == sorted(r[0] for r in REFERENCE)
    assert len(ubiops.DEPLOYMENT_OPERATIONS) == 31


REQUESTS = "/projects/{project_name}/deployments/{deployment_name}"
REQUEST_TABLE = [
    ("deployment_requests_create", "POST", "/requests", "project_name deployment_name data"),
    (
        "deployment_version_requests_create",
        "POST",
        "/versions/{version}/requests",
        "project_name deployment_name version data",
    ),
    (
        "deployment_requests_get",
        "GET",
        "/requests/{request_id}",
        "project_name deployment_name request_id",
    ),
    (
        "deployment_version_requests_get",
        "GET",
        "/versions/{version}/requests/{request_id}",
        "project_name deployment_name version request_id",
    ),
    (
        "batch_deployment_requests_create",
        "POST",
        "/requests/batch",
        "project_name deployment_name data",
    ),
    (
        "batch_deployment_version_requests_create",
        "POST",
        "/versions/{version}/requests/batch",
        "project_name deployment_name version data",
    ),
]


@pytest.mark.parametrize(("name", "method", "path", "required"), REQUEST_TABLE)
def test_request_operations_are_in_the_catalog(
    name: str, method: str, path: str, required: str
) -> None:
    op = ubiops.OPERATIONS_BY_NAME[name]
    assert (op.method, op.path) == (method, REQUESTS + path)
    assert op.required_params == frozenset(required.split())
    assert apis.registry()[f"ubiops.{name}"] is op


@pytest.mark.parametrize(("name", "method", "path", "required", "optional"), REFERENCE)
def test_operation_matches_reference(
    name: str, method: str, path: str, required: str, optional: str
) -> None:
    op = ubiops.OPERATIONS_BY_NAME[name]
    assert op.full_name == f"ubiops.{name}"
    assert (op.method, op.path) == (method, DEPLOYMENTS + path)
    assert op.required_params == frozenset(required.split())
    optional_names = set(optional.split()) | EXTENSIONS.get(name, set())
    assert op.param_names - op.required_params == optional_names


def _sample(param: Param) -> Any:
    return {"data": {"sample": param.name}, "file": "/tmp/model.zip"}.get(
        param.name, f"{param.name}-1"
    )


@pytest.mark.parametrize("name", [r[0] for r in REFERENCE])
def test_plan_request_fills_every_required_param(name: str) -> None:
    op = ubiops.OPERATIONS_BY_NAME[name]
    params = {p.name: _sample(p) for p in op.params if p.required}
    # revisions_file_upload: one source of the file is needed (the first: a file)
    params |= {p.name: _sample(p) for p in op.params if op.one_of and p.name in op.one_of[0]}
    planned = plan_request(op, params)
    expected_path = op.path.format_map({p.name: f"{p.name}-1" for p in op.params})
    assert planned.method == op.method
    assert planned.path == expected_path
    assert "{" not in planned.path
    assert planned.query == ()
    assert planned.json_body == params.get("data")
    assert planned.file_path == params.get("file")
    for p in op.params:
        if p.required:
            missing = {k: v for k, v in params.items() if k != p.name}
            with pytest.raises(ActionError, match=f"missing required parameter.*{p.name}"):
                plan_request(op, missing)


@pytest.mark.parametrize("name", [r[0] for r in REFERENCE])
def test_plan_request_refuses_unknown_params(name: str) -> None:
    op = ubiops.OPERATIONS_BY_NAME[name]
    params = {p.name: _sample(p) for p in op.params if p.required}
    with pytest.raises(ActionError, match=r"unknown parameter.*bogus") as info:
        plan_request(op, {**params, "bogus": 1})
    assert info.value.retryable is False


def test_plan_request_quotes_path_params() -> None:
    op = ubiops.OPERATIONS_BY_NAME["deployments_get"]
    planned = plan_request(op, {"project_name": "ml prod", "deployment_name": "a/../b?c"})
    assert planned.path == "/projects/ml%20prod/deployments/a%2F..%2Fb%3Fc"


def test_plan_request_query_skips_none_and_renders_values() -> None:
    op = ubiops.OPERATIONS_BY_NAME["deployment_audit_events_list"]
    planned = plan_request(
        op,
        {"project_name": "p", "deployment_name": "d", "action": None, "limit": 5, "offset": 0},
    )
    assert planned.query == (("limit", "5"), ("offset", "0"))


def test_plan_request_joins_list_query_values_and_lowercases_booleans() -> None:
    op = Operation(
        "svc",
        "things_list",
        "GET",
        "/things",
        (
            Param("tag", "query", many=True),
            Param("deleted", "query"),
            Param("page_size", "query", wire_name="pageSize"),
        ),
    )
    planned = plan_request(op, {"tag": ["a", "b"], "deleted": False, "page_size": 25})
    # a list is sent comma-separated, as the SDKs send `expand` (csv collection format)
    assert planned.query == (("tag", "a,b"), ("deleted", "false"), ("pageSize", "25"))
    assert planned.query_string == "tag=a%2Cb&deleted=false&pageSize=25"
    with pytest.raises(ActionError, match="deleted takes a single value, not a list"):
        plan_request(op, {"deleted": [True, False]})
    with pytest.raises(ActionError, match="tag takes a list of plain values"):
        plan_request(op, {"tag": [["a"]]})


def test_plan_request_upload_puts_file_and_form_fields() -> None:
    op = ubiops.OPERATIONS_BY_NAME["revisions_file_upload"]
    where = {"project_name": "p", "deployment_name": "d", "version": "v1"}
    planned = plan_request(op, {**where, "file": "/srv/model.zip"})
    assert planned == PlannedRequest(
        "POST", "/projects/p/deployments/d/versions/v1/revisions", file_path="/srv/model.zip"
    )
    assert planned.multipart
    copied = plan_request(op, {**where, "source_deployment": "other", "source_version": "v2"})
    assert copied.file_path is None
    assert copied.form == (("source_deployment", "other"), ("source_version", "v2"))
    assert copied.multipart


def test_plan_request_download_path_and_optional_body() -> None:
    download = ubiops.OPERATIONS_BY_NAME["revisions_file_download"]
    where = {"project_name": "p", "deployment_name": "d", "version": "v1", "revision_id": "r"}
    planned = plan_request(download, {**where, "save_to": "/tmp/out.zip"})
    assert planned.download_path == "/tmp/out.zip"
    assert not planned.multipart
    rebuild = ubiops.OPERATIONS_BY_NAME["revisions_rebuild"]
    assert plan_request(rebuild, where).json_body is None


def test_registry_is_the_union_keyed_by_full_name_and_cached() -> None:
    ops = registry()
    for op in ubiops.OPERATIONS:
        assert ops[op.full_name] is op
    assert all(key == op.full_name for key, op in ops.items())
    assert {key.partition(".")[0] for key in ops} >= {"ubiops"}
    assert registry() is ops  # every service module exists: built once, then cached


def test_build_registry_refuses_a_name_defined_twice() -> None:
    op = Operation("svc", "x", "GET", "/x")
    assert build_registry({"a": (op,)}) == {"svc.x": op}
    with pytest.raises(ValueError, match=r"svc\.x"):
        build_registry({"a": (op,), "b": (op,)})


def test_every_create_spec_names_an_operation_it_can_call() -> None:
    creates = [op for op in ubiops.OPERATIONS if op.creates is not None]
    assert {op.name for op in creates} == {
        "deployments_create",
        "deployment_versions_create",
        "deployment_environment_variables_create",
        "deployment_version_environment_variables_create",
    }
    for op in creates:
        assert op.creates is not None
        lookup = ubiops.OPERATIONS_BY_NAME[op.creates.lookup]
        assert {name for name, _ in op.creates.params} == lookup.required_params


VERSION_CREATE = ubiops.OPERATIONS_BY_NAME["deployment_versions_create"]
VARIABLE_CREATE = ubiops.OPERATIONS_BY_NAME["deployment_environment_variables_create"]


def test_lookup_params_derive_from_the_create_params() -> None:
    params = {"project_name": "p", "deployment_name": "d", "data": {"version": "v7"}}
    assert lookup_params(VERSION_CREATE, params) == {
        "project_name": "p",
        "deployment_name": "d",
        "version": "v7",
    }
    assert lookup_params(VERSION_CREATE, {**params, "data": {}}) is None
    assert lookup_params(ubiops.OPERATIONS_BY_NAME["deployments_get"], params) is None


def test_find_existing_matches_own_variable_by_name_not_an_inherited_one() -> None:
    params = {"project_name": "p", "deployment_name": "d", "data": {"name": "A", "value": "1"}}
    inherited = {"id": "1", "name": "A", "value": "0", "inheritance_type": "project"}
    own = {"id": "2", "name": "A", "value": "1", "inheritance_type": None}
    other = {"id": "3", "name": "B", "value": "1", "inheritance_type": None}
    assert find_existing(VARIABLE_CREATE, params, [inherited, other]) is None
    assert find_existing(VARIABLE_CREATE, params, [inherited, own, other]) == own
    assert find_existing(VARIABLE_CREATE, params, {"not": "a list"}) is None
    assert find_existing(VERSION_CREATE, params, {"version": "v"}) == {"version": "v"}


def test_mismatches_compare_only_fields_asked_for_and_shown() -> None:
    params = {"data": {"name": "A", "value": "new", "secret": False}}
    assert mismatches(VARIABLE_CREATE, params, {"value": "old", "secret": False}) == ["value"]
    assert mismatches(VARIABLE_CREATE, params, {"value": "new", "secret": False}) == []
    # a secret's value is never shown (null): it cannot count as different
    secret = {"data": {"name": "A", "value": "x", "secret": True}}
    assert mismatches(VARIABLE_CREATE, secret, {"value": None, "secret": True}) == []


def test_create_spec_constant_null_match() -> None:
    spec = CreateSpec("things_list", (), match=(("parent", None),))
    op = Operation("svc", "things_create", "POST", "/t", (Param("body", "body"),), spec)
    assert find_existing(op, {}, [{"parent": "x"}, {"parent": None, "id": 1}]) == {
        "parent": None,
        "id": 1,
    }
