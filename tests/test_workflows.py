"""Workflows end to end through the outbox: if, until, fail_if, on_failure, concurrency,
one run per Jira change. Real database (both engines), real fake UbiOps over HTTP; the
executor's clock is moved by hand, so waits of minutes pass without waiting."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from bot.db.engine import create_engine
from bot.db.models import action_runs
from bot.db.queries import get_event
from bot.pipeline.executor import ActionExecutor
from bot.pipeline.processor import EventProcessor
from tests.workflow_world import ROLLOUT, Env, _uploads, drive, issue_updated, write_rules
from tests.workflow_world import env as env  # the fixture


async def test_rollout_waits_for_the_build_smoke_tests_and_promotes(env: Env) -> None:
    event_id = await env.deliver(issue_updated("OPS-1", customfield_10054=2), "d-1")
    executor = env.executor()
    # create, upload, first build read ("queued"): the step waits, holding no worker.
    for _ in range(3):
        assert await executor.run_once() == 1
    runs = await env.runs(event_id)
    build = runs[2]
    assert build["status"] == "waiting"
    assert build["result"]["status"] == "queued"  # the last answer is kept
    assert build["next_attempt_at"] == (env.clock.now + timedelta(minutes=10)).isoformat()
    assert await executor.run_once() == 0  # not due before its next check
    env.clock.advance(minutes=10)
    await drive(executor, env.clock)
    assert await env.statuses(event_id) == [
        "succeeded", "succeeded", "succeeded", "succeeded", "succeeded",
        "skipped", "skipped",
    ]  # fmt: skip
    runs = await env.runs(event_id)
    assert runs[5]["last_error"] == "not needed: no step of do is dead"
    # Each attempt keeps its answer's HTTP status: the create 201, the build's reads 200
    # (waiting twice, then done), the smoke test and the promote 200; the clean-up steps,
    # not needed, were never attempted.
    assert [[a["status_code"] for a in r["attempt_log"]] for r in runs] == [
        [201], [201], [200, 200, 200], [200], [200], [], [],
    ]  # fmt: skip
    assert runs[3]["result"]["result"] == {"output": 4.0}
    assert env.fake.projects["ml-prod"]["churn"].data["default_version"] == "ops-1"
    # Typed: the number from Jira arrived as a number, the default as a number.
    created = env.fake.calls("POST", r".*/deployments/churn/versions")[0].json
    assert created["maximum_instances"] == 2
    assert _uploads(env.fake, "ops-1") == 1
    # Three reads of the revision: queued, building, success.
    assert len(env.fake.calls("GET", r".*/versions/ops-1/revisions/[^/]+")) == 3


async def test_failed_build_runs_on_failure_with_the_failure(
    env: Env, aiohttp_server: Callable[..., Any]
) -> None:
    env.fake.build_steps = ("queued", "building", "failed")
    event_id = await env.deliver(issue_updated("OPS-2"), "d-2")
    await drive(env.executor(), env.clock)
    runs = await env.runs(event_id)
    assert [r["status"] for r in runs] == [
        "succeeded", "succeeded", "dead", "skipped", "skipped", "succeeded", "succeeded",
    ]  # fmt: skip
    assert runs[2]["last_error"] == "fail_if: result.status equals 'failed' held"
    assert runs[2]["result"]["status"] == "failed"
    # The clean-up removed the half-made version; the promote never happened.
    assert "ops-2" not in env.fake.version_names("ml-prod", "churn")
    assert env.fake.calls("PATCH", r".*/deployments/churn") == []
    async with env.engine.connect() as conn:
        failure = (
            await conn.execute(
                select(action_runs.c.failure).where(
                    action_runs.c.event_id == event_id, action_runs.c.step_index == 1000
                )
            )
        ).scalar_one()
    assert failure == {
        "step": 3,
        "step_id": "build",
        "action": "ubiops.revisions_get",
        "error": "fail_if: result.status equals 'failed' held",
        "attempts": 1,
        "status_code": None,
    }
    # The second on_failure step rendered `failure.step_id` into its query.
    audit = env.fake.calls("GET", r".*/deployments/churn/audit")
    assert dict(audit[0].query)["action"] == "build"


async def test_until_times_out(env: Env) -> None:
    env.fake.build_steps = ("queued", "building")  # never finishes
    event_id = await env.deliver(issue_updated("OPS-3"), "d-3")
    executor = env.executor()
    for _ in range(3):
        await executor.run_once()
    for _ in range(13):  # 12 x 10 min = the 2 h timeout
        env.clock.advance(minutes=10)
        await executor.run_once()
    await drive(executor, env.clock)
    runs = await env.runs(event_id)
    assert runs[2]["status"] == "dead"
    assert runs[2]["last_error"].startswith("timed out waiting for result.status in")
    assert runs[5]["status"] == "succeeded"  # the clean-up ran


async def test_if_false_skips_the_step_with_why_and_later_steps_run(env: Env) -> None:
    env.fake.failing_versions.add("ops-4")
    event_id = await env.deliver(issue_updated("OPS-4"), "d-4")
    await drive(env.executor(), env.clock)
    runs = await env.runs(event_id)
    assert [r["status"] for r in runs][:5] == [
        "succeeded", "succeeded", "succeeded", "succeeded", "skipped",
    ]  # fmt: skip
    assert runs[4]["last_error"] == "if: steps.smoke.success: False does not equal True"
    assert env.fake.calls("PATCH", r".*/deployments/churn") == []  # never promoted


async def test_a_waiting_step_resumes_in_another_process_without_uploading_again(
    env: Env,
) -> None:
    event_id = await env.deliver(issue_updated("OPS-5"), "d-5")
    first = env.executor()
    for _ in range(3):
        await first.run_once()
    assert (await env.runs(event_id))[2]["status"] == "waiting"
    # The process dies; another one (new owner, new engine) finds the wait in the table.
    del first
    env.clock.advance(minutes=10)
    await drive(env.executor(), env.clock)
    assert await env.statuses(event_id) == [
        "succeeded", "succeeded", "succeeded", "succeeded", "succeeded", "skipped", "skipped",
    ]  # fmt: skip
    assert _uploads(env.fake, "ops-5") == 1


async def test_a_killed_poll_is_claimed_again_after_its_lease(env: Env) -> None:
    event_id = await env.deliver(issue_updated("OPS-6"), "d-6")
    first = env.executor(lease_s=60)
    for _ in range(3):
        await first.run_once()
    env.clock.advance(minutes=10)
    # Claimed for its next poll, then the process is killed before it answers.
    claimed = await first.claim(1)
    assert [r.step_index for r in claimed] == [2]
    second = env.executor(lease_s=60)
    assert await second.claim(1) == []  # within the lease nobody takes it
    env.clock.advance(seconds=61)
    await drive(second, env.clock)
    assert (await env.statuses(event_id))[:5] == ["succeeded"] * 5
    assert _uploads(env.fake, "ops-6") == 1


async def test_runs_of_one_key_take_turns_in_received_order(env: Env) -> None:
    rollout = await env.deliver(issue_updated("OPS-7"), "d-7")
    executor = env.executor(concurrency=4)
    for _ in range(3):
        await executor.run_once()  # the rollout waits on its build
    rollback = await env.deliver(issue_updated("OPS-8"), "d-8")
    other_model = await env.deliver(issue_updated("OPS-9", "fraud"), "d-9")
    await executor.run_once()
    # The rollback waits for the rollout's key; another model's run goes ahead.
    assert await env.statuses(rollback) == ["pending"] * 5 + ["held"] * 2
    assert (await env.statuses(other_model))[0] == "succeeded"
    # Each shows what it waits for: the key's holder, the next check.
    assert (await env.runs(rollback))[0]["waiting_for"] == (
        f"concurrency key 'ubiops/ml-prod/churn': held by event {rollout} (rule rollout)"
    )
    build = (await env.runs(rollout))[2]
    assert build["waiting_for"] == f"until: next check at {build['next_attempt_at']}"
    await drive(executor, env.clock)
    assert (await env.statuses(rollout))[:5] == ["succeeded"] * 5
    assert (await env.statuses(rollback))[:5] == ["succeeded"] * 5
    # The rollback's promote came last: its version is the default.
    assert env.fake.projects["ml-prod"]["churn"].data["default_version"] == "ops-8"
    promotes = [c.json["default_version"] for c in env.fake.calls("PATCH", r".*/churn")]
    assert promotes == ["ops-7", "ops-8"]


async def test_pending_latest_keeps_only_the_newest_waiting_run(env: Env) -> None:
    text = ROLLOUT.replace(
        'concurrency: "ubiops/ml-prod/{{ issue.fields.customfield_10050 }}"',
        'concurrency: {key: "ubiops/ml-prod/{{ issue.fields.customfield_10050 }}", '
        "pending: latest}",
    )
    ruleset = write_rules(env.rules_dir, text)
    processor = EventProcessor(env.engine, lambda: ruleset, clock=env.clock)
    env.processor = processor
    first = await env.deliver(issue_updated("OPS-10"), "d-10")
    executor = env.executor()
    await executor.run_once()  # the first run holds the key
    second = await env.deliver(issue_updated("OPS-11"), "d-11")
    third = await env.deliver(issue_updated("OPS-12"), "d-12")
    assert await env.statuses(second) == ["superseded"] * 7
    assert (await env.runs(second))[0]["last_error"] == (
        f"superseded by event {third} (rule rollout)"
    )
    await drive(executor, env.clock)
    assert (await env.statuses(first))[:5] == ["succeeded"] * 5
    assert (await env.statuses(third))[:5] == ["succeeded"] * 5
    assert "ops-11" not in env.fake.version_names("ml-prod", "churn")


async def test_a_crashed_holder_keeps_its_key_until_its_lease_ends_then_goes_on(
    env: Env,
) -> None:
    holder = await env.deliver(issue_updated("OPS-13"), "d-13")
    crashed = env.executor(lease_s=60)
    assert [r.event_id for r in await crashed.claim(1)] == [holder]  # then killed
    queued = await env.deliver(issue_updated("OPS-14"), "d-14")
    survivor = env.executor(lease_s=60)
    assert await survivor.claim(4) == []  # the key is held; the holder's lease is alive
    env.clock.advance(seconds=61)
    await drive(survivor, env.clock)
    assert (await env.statuses(holder))[:5] == ["succeeded"] * 5
    assert (await env.statuses(queued))[:5] == ["succeeded"] * 5


async def test_one_jira_change_acts_once_whatever_delivery_brings_it(env: Env) -> None:
    first = await env.deliver(issue_updated("OPS-15", change=77), "d-15")
    again = await env.deliver(issue_updated("OPS-15", change=77), "d-15-resent")
    other_change = await env.deliver(issue_updated("OPS-15", "fraud", change=78), "d-15b")
    assert len(await env.runs(first)) == 7
    assert await env.runs(again) == []
    assert len(await env.runs(other_change)) == 7
    shown = await get_event(env.engine, again)
    assert shown is not None
    assert shown["matches"] == [
        {
            "rule": "rollout",
            "matched": True,
            "reason": f"this Jira change was already acted on by event {first}; "
            "`events replay` of that event runs it again",
        }
    ]


async def test_a_key_that_does_not_render_kills_the_run_with_why(env: Env) -> None:
    payload = issue_updated("OPS-16")
    del payload["issue"]["fields"]["customfield_10050"]
    event_id = await env.deliver(payload, "d-16")
    runs = await env.runs(event_id)
    assert runs[0]["status"] == "dead"
    assert "concurrency" in runs[0]["last_error"]
    assert "customfield_10050" in runs[0]["last_error"]
    assert await env.executor().run_once() == 0
    async with env.engine.begin() as conn:  # nothing else of it is due
        await conn.execute(update(action_runs).values(next_attempt_at=None))
    assert await env.executor().run_once() == 0


async def test_retrying_a_dead_step_holds_the_clean_up_again(env: Env) -> None:
    from bot.db.queries import retry_action_run
    from bot.pipeline.replay import reset_events

    env.fake.build_steps = ("queued", "failed")
    event_id = await env.deliver(issue_updated("OPS-17"), "d-17")
    executor = env.executor()
    await drive(executor, env.clock)
    runs = await env.runs(event_id)
    assert [r["status"] for r in runs] == [
        "succeeded", "succeeded", "dead", "skipped", "skipped", "succeeded", "succeeded",
    ]  # fmt: skip
    # The clean-up deleted the version; make it exist again, then retry the dead build read.
    await env.runner.run(
        "ubiops.deployment_versions_create",
        {"project_name": "ml-prod", "deployment_name": "churn", "data": {"version": "ops-17"}},
        state=None, lookup_first=False, tenant="",
    )  # fmt: skip
    outcome = await retry_action_run(env.engine, runs[2]["id"], env.clock.now)
    assert outcome is not None and outcome[0] == "dead"
    assert await env.statuses(event_id) == [
        "succeeded", "succeeded", "pending", "pending", "pending", "held", "held",
    ]  # fmt: skip
    # It dies again (the new version has no such revision): the clean-up runs again.
    await drive(executor, env.clock)
    assert (await env.statuses(event_id))[5:] == ["succeeded", "succeeded"]
    # A replay of the event: the same, held first, to run only on a new death.
    _, ids = await reset_events(env.engine, [event_id])
    assert ids == [event_id]
    assert await env.statuses(event_id) == [
        "succeeded", "succeeded", "pending", "pending", "pending", "held", "held",
    ]  # fmt: skip


async def test_replicas_claiming_at_once_start_one_run_of_a_key(
    env: Env, database_url: str
) -> None:
    # Several keyed runs not started, and claims from several replicas (own engines,
    # owners) at the same moment: exactly one run of the key starts, the oldest.
    ids = [await env.deliver(issue_updated(f"OPS-{20 + i}"), f"d-2{i}") for i in range(4)]
    assert (await env.runs(ids[0]))[0]["waiting_for"] is None
    assert (await env.runs(ids[2]))[0]["waiting_for"] == (
        f"concurrency key 'ubiops/ml-prod/churn': queued behind event {ids[0]} (rule rollout)"
    )
    engines = [create_engine(database_url) for _ in range(3)]
    try:
        replicas = [
            ActionExecutor(e, env.runner, rules_dir=env.rules_dir, clock=env.clock) for e in engines
        ]
        import asyncio

        claimed = await asyncio.gather(*(r.claim(4) for r in replicas))
    finally:
        for engine in engines:
            await engine.dispose()
    started = [run.event_id for batch in claimed for run in batch]
    assert started == [ids[0]]


async def test_events_show_prints_the_wait_and_the_queue(
    env: Env,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import asyncio

    from bot.cli.main import main

    rollout = await env.deliver(issue_updated("OPS-30"), "d-30")
    executor = env.executor()
    for _ in range(3):
        await executor.run_once()
    queued = await env.deliver(issue_updated("OPS-31"), "d-31")
    monkeypatch.setenv("DEPLOYBOT_DATABASE_URL", database_url)

    def show(event_id: int) -> str:
        assert main(["events", "show", str(event_id)]) == 0
        return capsys.readouterr().out

    out = await asyncio.to_thread(show, rollout)
    assert "rollout#2 ubiops.revisions_get: waiting" in out
    assert "    waiting for until: next check at " in out
    assert '    last answer: {"id":' in out and '"status":"queued"' in out
    out = await asyncio.to_thread(show, queued)
    assert (
        f"    waiting for concurrency key 'ubiops/ml-prod/churn': held by event {rollout} "
        "(rule rollout)"
    ) in out


@pytest.mark.parametrize("hostile", ["churn\x00", "m" * 600])
async def test_a_hostile_key_kills_the_run_without_storing_it(env: Env, hostile: str) -> None:
    event_id = await env.deliver(issue_updated("OPS-40", hostile), "d-40")
    runs = await env.runs(event_id)
    assert [r["status"] for r in runs] == ["dead"] + ["skipped"] * 6
    assert "is empty or unusable" in runs[0]["last_error"]
    assert "\x00" not in runs[0]["last_error"]
    assert all(r["concurrency_key"] is None for r in runs)
    assert await env.executor().run_once() == 0


async def _waiting_since(env: Env, event_id: int) -> Any:
    async with env.engine.connect() as conn:
        return (
            await conn.execute(
                select(action_runs.c.waiting_since).where(
                    action_runs.c.event_id == event_id, action_runs.c.step_index == 2
                )
            )
        ).scalar_one()


async def test_a_failed_poll_keeps_the_wait_and_a_retried_timeout_waits_afresh(env: Env) -> None:
    from bot.db.queries import retry_action_run
    from tests.fakes.ubiops import Fault

    env.fake.build_steps = ("queued", "building")  # never finishes
    event_id = await env.deliver(issue_updated("OPS-50"), "d-50")
    executor = env.executor()
    for _ in range(3):
        await executor.run_once()
    since = await _waiting_since(env, event_id)
    assert since is not None
    env.fake.fail_next(2, Fault(status=503))  # both of the client's tries: the call fails
    env.clock.advance(minutes=10)
    await executor.run_once()
    assert (await env.runs(event_id))[2]["status"] == "retrying"
    assert await _waiting_since(env, event_id) == since  # the timeout still counts from it
    await drive(executor, env.clock, rounds=60)
    runs = await env.runs(event_id)
    assert runs[2]["last_error"].startswith("timed out waiting for")
    await retry_action_run(env.engine, runs[2]["id"], env.clock.now)
    assert await _waiting_since(env, event_id) is None
    polls = len(env.fake.calls("GET", r".*/versions/ops-50/revisions/[^/]+"))
    await executor.run_once()
    # Called afresh, not timed out at once (its clean-up had deleted the version: a 404).
    assert len(env.fake.calls("GET", r".*/versions/ops-50/revisions/[^/]+")) == polls + 1
    assert not (await env.runs(event_id))[2]["last_error"].startswith("timed out")


async def test_a_clean_up_that_was_not_needed_is_not_retried(env: Env) -> None:
    """A retried `on_failure` step that was skipped would undo a rollout that succeeded
    (here: delete the promoted version). Refused by every way to retry; no button."""
    from bot.db.queries import retry_action_run
    from bot.errors import RetryRefused
    from bot.web.status import _retry_offer

    event_id = await env.deliver(issue_updated("OPS-61"), "d-61")
    executor = env.executor()
    await drive(executor, env.clock)
    runs = await env.runs(event_id)
    assert [r["status"] for r in runs][5:] == ["skipped", "skipped"]
    calls = len(env.fake.requests)
    for clean_up in runs[5:]:
        with pytest.raises(RetryRefused, match="on_failure step that was skipped") as refused:
            await retry_action_run(env.engine, clean_up["id"], env.clock.now)
        assert refused.value.retry_instead is None  # no step of do is dead
        assert _retry_offer(clean_up, runs) is None
    assert [r["status"] for r in await env.runs(event_id)] == [r["status"] for r in runs]
    assert await executor.claim(4) == []
    assert len(env.fake.requests) == calls
    assert env.fake.version_names("ml-prod", "churn") == ["ops-61"]


async def test_a_step_behind_a_dead_one_is_not_retried_alone(env: Env) -> None:
    from bot.db.queries import retry_action_run
    from bot.errors import RetryRefused

    env.fake.build_steps = ("queued", "failed")
    event_id = await env.deliver(issue_updated("OPS-60"), "d-60")
    executor = env.executor()
    await drive(executor, env.clock)
    runs = await env.runs(event_id)
    assert [r["status"] for r in runs][2:5] == ["dead", "skipped", "skipped"]
    # The promote follows a step skipped behind the dead build read, not one skipped by
    # its `if`: retrying it alone is refused, naming the dead step to retry instead.
    with pytest.raises(RetryRefused) as refused:
        await retry_action_run(env.engine, runs[4]["id"], env.clock.now)
    assert refused.value.retry_instead == runs[2]["id"]
    assert (await env.runs(event_id))[4]["status"] == "skipped"
    assert await executor.claim(4) == []
