"""Tables for the webhook planner: grouping, limits, diff."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bot.core.webhook_plan import (
    Desired,
    Need,
    RegisteredWebhook,
    SyncPlan,
    WebhookSpec,
    desired_webhooks,
    plan_sync,
)

UPD, CRE, DEL = "jira:issue_updated", "jira:issue_created", "jira:issue_deleted"
EXPIRY = datetime(2030, 1, 1, tzinfo=UTC)


def need(rule: str, jql: str, *events: str, fields: tuple[str, ...] | None = None) -> Need:
    return Need(rule, events or (UPD,), jql, fields)


def hook(
    webhook_id: int, jql: str, *events: str, fields: tuple[str, ...] | None = None
) -> RegisteredWebhook:
    return RegisteredWebhook(webhook_id, WebhookSpec(events or (UPD,), jql, fields), EXPIRY)


@pytest.mark.parametrize(
    ("needs", "expected"),
    [
        pytest.param([], [], id="nothing"),
        pytest.param(
            [need("a", "project = OPS", UPD), need("b", "project  =  OPS ", CRE, UPD)],
            [Desired(WebhookSpec((CRE, UPD), "project = OPS"), ("a", "b"))],
            id="same-jql-unites-events",
        ),
        pytest.param(
            [
                need("a", "project = OPS", fields=("status", "labels")),
                need("b", "project = OPS", DEL, fields=("labels", "status", "labels")),
            ],
            [Desired(WebhookSpec((DEL, UPD), "project = OPS", ("labels", "status")), ("a", "b"))],
            id="fields-order-does-not-matter",
        ),
        pytest.param(
            [
                need("a", "project = OPS"),
                need("b", "project = OPS", fields=("status",)),
                need("c", "project = OPS", fields=()),
            ],
            [
                Desired(WebhookSpec((UPD,), "project = OPS"), ("a",)),
                Desired(WebhookSpec((UPD,), "project = OPS", ("status",)), ("b",)),
                Desired(WebhookSpec((UPD,), "project = OPS", ()), ("c",)),
            ],
            id="different-fields-stay-apart",
        ),
        pytest.param(
            [need("z", "project = B"), need("a", "project = A"), need("z", "project = B")],
            [
                Desired(WebhookSpec((UPD,), "project = B"), ("z",)),
                Desired(WebhookSpec((UPD,), "project = A"), ("a",)),
            ],
            id="rule-order-kept-and-deduped",
        ),
    ],
)
def test_grouping(needs: list[Need], expected: list[Desired]) -> None:
    assert desired_webhooks(needs) == expected


def test_spec_is_canonical_and_serializes_like_jira() -> None:
    spec = WebhookSpec((UPD, CRE, UPD), "  project = OPS\n AND status = Done ", ("b", "a"))
    assert spec == WebhookSpec((CRE, UPD), "project = OPS AND status = Done", ("a", "b"))
    assert spec.to_json() == {
        "events": [CRE, UPD],
        "jqlFilter": "project = OPS AND status = Done",
        "fieldIdsFilter": ["a", "b"],
    }
    assert "fieldIdsFilter" not in WebhookSpec((UPD,), "project = OPS").to_json()
    assert "issuePropertyKeysFilter" not in WebhookSpec((UPD,), "project = OPS").to_json()


def test_property_keys_are_the_issue_property_keys_filter_and_keep_webhooks_apart() -> None:
    prop = "issue_property_set"
    keyed = Need("a", (prop,), "project = OPS", None, ("env", "target", "env"))
    plain = Need("b", (prop,), "project = OPS")
    desired = desired_webhooks([keyed, plain])
    assert [d.rules for d in desired] == [("a",), ("b",)]
    assert desired[0].spec.to_json() == {
        "events": [prop],
        "jqlFilter": "project = OPS",
        "issuePropertyKeysFilter": ["env", "target"],
    }
    held = RegisteredWebhook(
        3, WebhookSpec((prop,), "project = OPS", None, ("target", "env")), None
    )
    plan = plan_sync([keyed], [held], "connect")
    assert (plan.register, plan.delete, plan.keep) == ((), (), (held,))


@pytest.mark.parametrize(
    ("mode", "count", "kept", "dropped"),
    [
        ("oauth", 5, 5, ()),
        ("oauth", 7, 5, ("r5", "r5b", "r6")),
        ("connect", 100, 100, ()),
        ("connect", 101, 100, ("r100",)),
    ],
)
def test_limits_drop_the_last_rules_with_an_error(
    mode: str, count: int, kept: int, dropped: tuple[str, ...]
) -> None:
    needs = [need(f"r{n}", f"project = P{n}") for n in range(count)]
    if count == 7:
        needs.insert(6, need("r5b", "project = P5", CRE))  # shares r5's webhook: dropped with it
    plan = plan_sync(needs, [], mode)  # type: ignore[arg-type]
    assert len(plan.register) == kept
    assert plan.dropped_rules == dropped
    if dropped:
        (error,) = plan.errors
        assert f"need {count} webhooks but Jira allows {kept}" in error
        assert error.endswith(", ".join(dropped))
    else:
        assert plan.errors == ()


@pytest.mark.parametrize(
    ("needs", "registered", "expected"),
    [
        pytest.param([], [], SyncPlan((), (), ()), id="nothing"),
        pytest.param(
            [need("a", "project = OPS")],
            [hook(7, "project   = OPS")],
            SyncPlan((), (), (hook(7, "project = OPS"),)),
            id="equal-kept",
        ),
        pytest.param(
            [need("a", "project = OPS", UPD, CRE)],
            [hook(7, "project = OPS", UPD)],
            SyncPlan((Desired(WebhookSpec((CRE, UPD), "project = OPS"), ("a",)),), (7,), ()),
            id="changed-events-replaced",
        ),
        pytest.param(
            [need("a", "project = OPS", fields=("status",))],
            [hook(7, "project = OPS")],
            SyncPlan(
                (Desired(WebhookSpec((UPD,), "project = OPS", ("status",)), ("a",)),), (7,), ()
            ),
            id="changed-fields-replaced",
        ),
        pytest.param(
            [need("a", "project = OPS")],
            [hook(9, "project = OPS"), hook(4, "project = OPS"), hook(5, "project = OLD")],
            SyncPlan((), (5, 9), (hook(4, "project = OPS"),)),
            id="duplicates-and-stale-deleted",
        ),
        pytest.param(
            [need("a", "project = A"), need("b", "project = B")],
            [hook(1, "project = B")],
            SyncPlan(
                (Desired(WebhookSpec((UPD,), "project = A"), ("a",)),),
                (),
                (hook(1, "project = B"),),
            ),
            id="missing-registered",
        ),
    ],
)
def test_diff(needs: list[Need], registered: list[RegisteredWebhook], expected: SyncPlan) -> None:
    assert plan_sync(needs, registered, "connect") == expected


def test_over_limit_deletes_what_is_no_longer_wanted_before_registering() -> None:
    needs = [need(f"r{n}", f"project = P{n}") for n in range(6)]
    registered = [hook(1, "project = P5"), hook(2, "project = P0")]
    plan = plan_sync(needs, registered, "oauth")
    assert plan.delete == (1,)  # P5 fell beyond the limit: its slot is freed
    assert [d.spec.jql for d in plan.register] == [f"project = P{n}" for n in range(1, 5)]
    assert len(plan.keep) + len(plan.register) == 5
