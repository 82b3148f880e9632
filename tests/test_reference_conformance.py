"""Every operation of the API documents in shared/reference is an action a rule can call.

The documents themselves are parsed (method, path, parameter names), independently of
the adapters' tables, and every operation is then put into a rule file that the real
validator must accept and whose dry-run request must be the documented one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.core.apis import registry
from bot.core.catalog import plan_request
from bot.rules.loader import load_rules
from bot.rules.templates import build_context, render_params

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference"
pytestmark = pytest.mark.skipif(
    not REFERENCE.is_dir(), reason=f"API reference documents not found at {REFERENCE}"
)

# Parameters deploybot adds beyond the reference (documented in the adapters).
OUR_EXTRAS = {"ubiops.revisions_file_download": {"save_to"}}


@dataclass(frozen=True)
class Documented:
    action: str
    method: str
    path: str
    params: frozenset[str]


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _sections(text: str, header: re.Pattern[str]) -> dict[str, str]:
    """Split a document at each header match; the name is the first group that matched."""
    marks = [(next(g for g in m.groups() if g), m.start()) for m in header.finditer(text)]
    ends = [start for _, start in marks[1:]] + [len(text)]
    return {name: text[start:end] for (name, start), end in zip(marks, ends, strict=True)}


def _param_names(section: str) -> frozenset[str]:
    table = section.split("### Parameters", 1)[1].split("### Return type", 1)[0]
    return frozenset(re.findall(r"^\s*\|?\s*\*\*(\w+)\*\*\s*\|", table, re.M))


def _documented(service: str, name: str, method: str, path: str, section: str) -> Documented:
    params = _param_names(section) if "### Parameters" in section else frozenset()
    return Documented(f"{service}.{name}", method, path, params)


def _table_ops(service: str, text: str) -> list[Documented]:
    """Documents with a summary table `[**name**](...) | **METHOD** /path | ...`."""
    rows = re.findall(r"\[\*\*(\w+)\*\*\]\([^)]*\)\s*\|\s*\*\*(\w+)\*\*\s*(\S+)", text)
    # "# **builds_get**" (OpenAPI generator) or "# void deleteWidgetsDeployment(" (JS SDK)
    sections = _sections(text, re.compile(r"^# (?:\*\*(\w+)\*\*|\S+ (\w+)\()", re.M))
    return [_documented(service, name, method, path, sections[name]) for name, method, path in rows]


def _wrapped_ops(service: str, text: str) -> list[Documented]:
    """Genesys Python SDK documents: `<a name="op"></a>` ... `Wraps METHOD /path`."""
    out = []
    for name, section in _sections(text, re.compile(r'^<a name="(\w+)"></a>', re.M)).items():
        found = re.search(r"Wraps (\w+) (\S+)", section)
        assert found is not None, name
        out.append(_documented(service, name, found[1], found[2], section))
    return out


def _camel_to_snake(doc: Documented) -> Documented:
    """The widgets document is the JavaScript SDK's; rules use Python-style names."""
    service, name = doc.action.split(".")
    return Documented(
        f"{service}.{_snake(name)}", doc.method, doc.path, frozenset(_snake(p) for p in doc.params)
    )


def documented() -> list[Documented]:
    if not REFERENCE.is_dir():
        return []

    def read(name: str) -> str:
        return (REFERENCE / name).read_text()

    return [
        *_table_ops("ubiops", read("ubiops-deployments-api.md")),
        *_wrapped_ops("genesys", read("genesys-webdeployments-api.md")),
        *map(_camel_to_snake, _table_ops("genesys", read("genesys-widgets-api.md"))),
        *_table_ops("jira", read("jira-webhooks-api.md")),
    ]


DOCUMENTED = documented()


def test_the_documents_hold_what_the_issue_counts() -> None:
    services = [d.action.split(".")[0] for d in DOCUMENTED]
    assert services.count("ubiops") == 31
    assert services.count("genesys") == 19 + 5
    assert services.count("jira") == 5


def _placeholder(path: str) -> str:
    return re.sub(r"\{\w+\}", "{}", path)


@pytest.mark.parametrize("doc", DOCUMENTED, ids=[d.action for d in DOCUMENTED])
def test_operation_is_in_the_catalog_as_documented(doc: Documented) -> None:
    op = registry().get(doc.action)
    assert op is not None, f"{doc.action} is not an action"
    assert op.method == doc.method
    documented_path = (
        doc.path.removeprefix("/rest/api/3") if doc.action.startswith("jira.") else doc.path
    )
    assert _placeholder(op.path).endswith(_placeholder(documented_path))
    assert op.param_names - OUR_EXTRAS.get(doc.action, set()) == doc.params


def _value_for(name: str) -> Any:
    if name == "file":
        return "artifacts/model.zip"
    if (
        name in {"data", "body", "configuration_version", "deployment"}
        or name.startswith("container_for")
        or name.startswith("webhook_registration")
    ):
        return {"name": "{{ issue.key | lower }}"}
    if name == "save_to":
        return "artifacts/download.zip"
    return "{{ issue.key | lower }}-" + name


def test_every_operation_is_accepted_in_a_rule_and_plans_its_documented_request(
    tmp_path: Path,
) -> None:
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "model.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    steps = []
    for doc in DOCUMENTED:
        op = registry()[doc.action]
        # of alternative sources (revisions_file_upload), the first: a file
        left_out = {name for group in op.one_of[1:] for name in group}
        steps.append(
            {
                "action": doc.action,
                "with": {p.name: _value_for(p.name) for p in op.params if p.name not in left_out},
            }
        )
    rules = {
        "rules": [{"name": "everything", "on": {"events": ["jira:issue_updated"]}, "do": steps}]
    }
    (tmp_path / "all.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    ruleset = load_rules(tmp_path)
    [rule] = ruleset.rules
    assert [s.action for s in rule.steps] == [d.action for d in DOCUMENTED]
    context = build_context({"issue": {"key": "OPS-1"}}, event_id="1")
    for step, doc in zip(rule.steps, DOCUMENTED, strict=True):
        params = render_params(step, context)
        planned = plan_request(registry()[doc.action], params)
        assert planned.method == doc.method
        assert "{" not in planned.path, planned.path
