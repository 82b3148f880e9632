"""jira.add_comment, transition_issue, edit_issue, get_issue, search_issues in both auth
modes against the fake Jira, and the OAuth access token shared through the database."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select

from bot.db.engine import create_engine, upgrade
from bot.db.models import oauth_tokens
from bot.db.oauth_tokens import OAuthTokenStore
from bot.errors import ActionError
from bot.jira_app.access import JiraAccess, JiraActionClients
from bot.rules.dryrun import dry_run
from bot.rules.loader import load_rules
from bot.services.actions import Done, Wait
from bot.services.adf import plain_text, to_adf
from bot.services.jira import MARKER_PROPERTY, marker
from bot.services.runner import ActionRunner, action_registry
from tests.fakes.jira import issue_updated_payload
from tests.helpers import QUICK, World, make_world, tenant_of


@pytest.fixture(params=["connect", "oauth"])
async def world(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[World]:
    async for w in make_world(request.param, database_url):
        yield w


@pytest.fixture
async def oauth(database_url: str) -> AsyncIterator[World]:
    async for w in make_world("oauth", database_url):
        yield w


def runner_of(w: World, access: JiraAccess | None = None) -> ActionRunner:
    return ActionRunner({}, per_tenant={"jira": JiraActionClients(access or w.access())})


async def run(
    w: World,
    action: str,
    params: Mapping[str, object],
    *,
    key: str = "",
    lookup_first: bool = False,
) -> object:
    runner, state = runner_of(w), None
    while True:  # as the executor does: call again with the state a Wait kept
        outcome = await runner.run(
            action, params, tenant=tenant_of(w), key=key, lookup_first=lookup_first, state=state
        )
        if isinstance(outcome, Done):
            return outcome.result
        assert isinstance(outcome, Wait) and outcome.after_s == 0
        state = outcome.state


async def test_comment_transition_edit_get_and_search_in_both_auth_modes(world: World) -> None:
    fake = world.fake
    issue = fake.add_issue("OPS-7")
    comment = await run(
        world, "jira.add_comment", {"issue": "OPS-7", "body": "Deployed **v2**."}, key="k1"
    )
    assert isinstance(comment, dict) and comment["issue"] == "OPS-7" and not comment["existing"]
    [stored] = issue.comments
    assert stored["body"]["content"][0]["content"] == [
        {"type": "text", "text": "Deployed "},
        {"type": "text", "text": "v2", "marks": [{"type": "strong"}]},
        {"type": "text", "text": "."},
    ]
    assert stored["properties"] == [{"key": MARKER_PROPERTY, "value": {"marker": marker("k1")}}]

    moved = await run(
        world, "jira.transition_issue", {"issue": "OPS-7", "transition": "start deploy"}
    )
    assert moved == {
        "issue": "OPS-7",
        "transition": {"id": "21", "name": "Start deploy"},
        "status": "Deploying",
        "already": False,
    }
    assert issue.status == "Deploying"

    await run(
        world,
        "jira.edit_issue",
        {"issue": "OPS-7", "fields": {"summary": "Deployed"}, "update": {"labels": [{"add": "x"}]}},
    )
    assert issue.fields["summary"] == "Deployed" and issue.fields["labels"] == ["x"]

    got = await run(world, "jira.get_issue", {"issue": "OPS-7", "fields": ["status", "summary"]})
    assert isinstance(got, dict)
    assert got["fields"] == {"status": {"name": "Deploying"}, "summary": "Deployed"}

    found = await run(world, "jira.search_issues", {"jql": "project = OPS", "fields": "summary"})
    assert found == {
        "issues": [
            {
                "id": issue.id,
                "key": "OPS-7",
                "self": f"{fake.base_url}/rest/api/3/issue/{issue.id}",
                "fields": {"summary": "Deployed"},
            }
        ],
        "count": 1,
        "complete": True,
    }
    calls = fake.issue_requests()
    # Connect: each request signed with its own qsh; OAuth: a bearer token. Both checked.
    assert calls and all(c.auth_error is None and c.status < 300 for c in calls)
    if fake.mode == "oauth":
        assert fake.token_grants == 1 and fake.refused_grants == 0


async def test_a_comment_whose_answer_was_lost_is_found_by_its_marker(world: World) -> None:
    fake = world.fake
    issue = fake.add_issue("OPS-8")
    fake.lose_comment_answers = 1
    params = {"issue": "OPS-8", "body": "Deployment failed."}
    result = await run(world, "jira.add_comment", params, key="event-1/rule/3")
    assert isinstance(result, dict) and result["existing"] is True
    # Run again as after a crash (lookup_first): still the one comment.
    again = await run(world, "jira.add_comment", params, key="event-1/rule/3", lookup_first=True)
    assert isinstance(again, dict) and again["id"] == result["id"]
    assert len(issue.comments) == 1
    # Another run (another key) is another comment.
    await run(world, "jira.add_comment", params, key="event-2/rule/3", lookup_first=True)
    assert len(issue.comments) == 2


async def test_a_lost_answer_without_the_comment_fails_retryable(oauth: World) -> None:
    fake = oauth.fake
    fake.add_issue("OPS-9")
    await fake.close()  # no answer at all, and nothing stored
    with pytest.raises(ActionError) as caught:
        await run(oauth, "jira.add_comment", {"issue": "OPS-9", "body": "x"}, key="k")
    assert caught.value.retryable


async def test_a_transition_not_available_lists_the_ones_that_are(world: World) -> None:
    issue = world.fake.add_issue("OPS-3")
    with pytest.raises(ActionError) as caught:
        await run(world, "jira.transition_issue", {"issue": "OPS-3", "transition": "Ship it"})
    message = str(caught.value)
    assert "OPS-3 (status Ready to deploy) has no transition 'Ship it'" in message
    assert "available: Start deploy (21), Deploy failed (31)" in message
    assert not caught.value.retryable and issue.status == "Ready to deploy"


async def test_a_transition_already_made_counts_as_done(world: World) -> None:
    fake = world.fake
    issue = fake.add_issue("OPS-4", status="Failed")
    done = await run(world, "jira.transition_issue", {"issue": "OPS-4", "transition": "failed"})
    assert done == {"issue": "OPS-4", "status": "Failed", "transition": None, "already": True}
    # The answer of the move was lost: the retry (lookup_first, with the resolved target
    # kept in the state) sees the issue arrived and sends nothing.
    fake.add_issue("OPS-5", status="Deploying")
    runner, params = runner_of(world), {"issue": "OPS-5", "transition": "Deploy failed"}
    first = await runner.run("jira.transition_issue", params, tenant=tenant_of(world))
    assert isinstance(first, Wait)
    assert first.state == {"id": "31", "name": "Deploy failed", "to": "Failed"}
    moved = await runner.run(
        "jira.transition_issue", params, state=first.state, tenant=tenant_of(world)
    )
    assert isinstance(moved, Done) and moved.result["status"] == "Failed"
    again = await runner.run(
        "jira.transition_issue",
        params,
        state=first.state,
        lookup_first=True,
        tenant=tenant_of(world),
    )
    assert isinstance(again, Done) and again.result["already"] is True
    posts = [r for r in fake.issue_requests() if r.method == "POST"]
    assert len(posts) == 1 and issue.comments == []


async def test_a_transition_with_a_comment_and_fields(world: World) -> None:
    fake = world.fake
    issue = fake.add_issue("OPS-6", status="Deploying")
    await run(
        world,
        "jira.transition_issue",
        {
            "issue": "OPS-6",
            "transition": "31",
            "fields": {"resolution": {"name": "Won't Do"}},
            "comment": "Rolled back",
        },
    )
    assert issue.status == "Failed" and issue.fields["resolution"] == {"name": "Won't Do"}
    [comment] = issue.comments
    assert plain_text(comment["body"]) == "Rolled back\n"


@pytest.mark.parametrize(
    "hostile", ["..", ".", "OPS-1/../../webhook", "OPS-1?x=1", "", "OPS-0", "ops 1", True, None]
)
async def test_a_hostile_issue_key_is_refused_before_any_call(
    oauth: World, hostile: object
) -> None:
    oauth.fake.add_issue("OPS-1")
    for action, extra in (
        ("jira.add_comment", {"body": "x"}),
        ("jira.get_issue", {}),
        ("jira.edit_issue", {"fields": {"summary": "x"}}),
        ("jira.transition_issue", {"transition": "Done"}),
    ):
        with pytest.raises(ActionError, match=r"issue key|missing required"):
            await run(oauth, action, {"issue": hostile, **extra})
    assert oauth.fake.requests == []


async def test_comment_needs_exactly_one_of_body_and_adf(oauth: World) -> None:
    issue = oauth.fake.add_issue("OPS-2")
    for params in ({}, {"body": "a", "adf": to_adf("b")}, {"adf": {"type": "paragraph"}}):
        with pytest.raises(ActionError, match=r"body|adf"):
            await run(oauth, "jira.add_comment", {"issue": "OPS-2", **params})
    doc = {"type": "doc", "version": 1, "content": [{"type": "rule"}]}
    await run(oauth, "jira.add_comment", {"issue": "OPS-2", "adf": doc})
    assert issue.comments[0]["body"] == doc and issue.comments[0]["properties"] == []


async def test_search_follows_every_page_up_to_max_results(world: World) -> None:
    fake = world.fake
    fake.search_page_cap = 40  # Jira may give fewer than asked: the token says there is more
    for n in range(1, 106):
        fake.add_issue(f"WEB-{n}")
    fake.add_issue("OPS-1")
    everything = await run(world, "jira.search_issues", {"jql": "project = WEB"})
    assert isinstance(everything, dict)
    assert [i["key"] for i in everything["issues"]] == [f"WEB-{n}" for n in range(1, 106)]
    assert everything["complete"] is True
    some = await run(world, "jira.search_issues", {"jql": "project = WEB", "max_results": 50})
    assert isinstance(some, dict) and some["count"] == 50 and some["complete"] is False
    pages = [r for r in fake.issue_requests() if r.path == "/rest/api/3/search/jql"]
    assert [dict(r.query).get("nextPageToken") for r in pages] == [
        None, "40", "80", None, "40",
    ]  # fmt: skip


def test_light_markdown_becomes_adf() -> None:
    doc = to_adf(
        "# Deployed\nVersion `v2` of *model-x*\nsee [logs](https://x.example/l)\n\n"
        "- one\n- two\n\n1. first\n```bash\nrollback --now\n```\n{{ not a template }}"
    )
    assert [b["type"] for b in doc["content"]] == [
        "heading", "paragraph", "bulletList", "orderedList", "codeBlock", "paragraph",
    ]  # fmt: skip
    paragraph = doc["content"][1]["content"]
    assert {"type": "text", "text": "v2", "marks": [{"type": "code"}]} in paragraph
    assert {"type": "text", "text": "model-x", "marks": [{"type": "em"}]} in paragraph
    assert {"type": "hardBreak"} in paragraph
    link = {"type": "link", "attrs": {"href": "https://x.example/l"}}
    assert {"type": "text", "text": "logs", "marks": [link]} in paragraph
    assert doc["content"][4] == {
        "type": "codeBlock",
        "attrs": {"language": "bash"},
        "content": [{"type": "text", "text": "rollback --now"}],
    }
    assert plain_text(doc["content"][5]) == "{{ not a template }}\n"
    # No empty text nodes (Jira refuses them); a javascript: link stays text.
    assert to_adf("") == {"type": "doc", "version": 1, "content": [{"type": "paragraph"}]}
    assert "marks" not in json.dumps(to_adf("[x](javascript:alert(1))"))


# --- the OAuth access token shared through the database -------------------------------


async def test_twenty_concurrent_actions_on_two_replicas_share_one_refresh(
    oauth: World,
) -> None:
    fake = oauth.fake
    fake.add_issue("OPS-1")
    # PostgreSQL: a second replica's own pool. SQLite serves one process: a second set of
    # clients on the same engine (as the scheduler's beside the workers').
    postgres = oauth.settings.database_url.startswith("postgresql")
    other_engine = create_engine(oauth.settings.database_url) if postgres else oauth.engine
    try:
        replicas = [runner_of(oauth), runner_of(oauth, oauth.access(other_engine))]

        async def comment(n: int) -> None:
            await replicas[n % 2].run(
                "jira.add_comment", {"issue": "OPS-1", "body": f"c{n}"}, key=f"k{n}"
            )

        await asyncio.gather(*(comment(n) for n in range(20)))
        assert fake.token_grants == 1 and fake.refused_grants == 0
        # Jira revokes the token: the twenty 401s are answered by one refresh.
        fake.revoke_access_tokens()
        await asyncio.gather(*(comment(n) for n in range(20, 40)))
        assert fake.token_grants == 2 and fake.refused_grants == 0
        # Expired (by the clock): one refresh again.
        fake.now += 3600
        await asyncio.gather(*(comment(n) for n in range(40, 60)))
        assert fake.token_grants == 3 and fake.refused_grants == 0
        assert len(fake.issues["OPS-1"].comments) == 60
        stored = await OAuthTokenStore(
            oauth.engine, oauth.settings.jira_client_secret or ""
        ).current()
        assert stored is not None and stored.refresh_token == fake.refresh_token
        assert stored.generation == 3
    finally:
        if postgres:
            await other_engine.dispose()


async def test_a_restart_continues_with_the_stored_refresh_token(oauth: World) -> None:
    fake = oauth.fake
    fake.add_issue("OPS-1")
    configured = oauth.settings.jira_refresh_token
    await run(oauth, "jira.get_issue", {"issue": "OPS-1"})
    # The configured token is spent now; a "restarted" process (new engine, new clients)
    # must use the rotated one from the database, and the still fresh access token.
    await oauth.engine.dispose()
    engine = create_engine(oauth.settings.database_url)
    try:
        await upgrade(engine)
        restarted = replace(oauth, engine=engine)
        await run(restarted, "jira.get_issue", {"issue": "OPS-1"})
        assert fake.token_grants == 1
        fake.now += 3600
        await run(restarted, "jira.get_issue", {"issue": "OPS-1"})
        assert fake.token_grants == 2 and fake.refused_grants == 0
        assert fake.refresh_token != configured
    finally:
        await engine.dispose()


async def test_a_refused_refresh_token_says_how_to_put_it_right(oauth: World) -> None:
    oauth.fake.add_issue("OPS-1")
    spent = replace(oauth.settings, jira_refresh_token="not-a-token")
    access = JiraAccess(
        spent, oauth.engine, oauth.session, clock=lambda: oauth.fake.now, policy=QUICK
    )
    with pytest.raises(ActionError, match="consent the OAuth app again") as caught:
        await runner_of(oauth, access).run("jira.get_issue", {"issue": "OPS-1"})
    assert "not-a-token" not in str(caught.value)
    assert oauth.fake.refused_grants == 1


async def test_oauth_actions_of_a_connect_tenant_are_refused(oauth: World) -> None:
    with pytest.raises(Exception, match="no jira client for tenant 'jira:someone'"):
        await runner_of(oauth).run("jira.get_issue", {"issue": "OPS-1"}, tenant="jira:someone")


async def test_get_issue_result_drops_nul_characters(oauth: World) -> None:
    oauth.fake.add_issue("OPS-1", fields={"summary": "a\x00b"})
    got = await run(oauth, "jira.get_issue", {"issue": "OPS-1"})
    assert isinstance(got, dict) and got["fields"]["summary"] == "a\ufffdb"


async def test_the_stored_tokens_are_sealed_with_the_client_secret(oauth: World) -> None:
    fake = oauth.fake
    fake.add_issue("OPS-1")
    await run(oauth, "jira.get_issue", {"issue": "OPS-1"})
    async with oauth.engine.connect() as conn:
        [row] = (await conn.execute(select(oauth_tokens))).all()
    stored = " ".join(str(v) for v in row)
    [access] = fake.access_tokens
    assert fake.refresh_token not in stored and access not in stored
    # Readable with the secret, and not with another one (a rotated client secret): then
    # the row counts as absent and the configured token is tried (spent here: refused).
    assert await OAuthTokenStore(oauth.engine, fake.client_secret).current() is not None
    assert await OAuthTokenStore(oauth.engine, "another-secret").current() is None


DRY_RULES = """
rules:
  - name: tell-jira
    on: {events: [jira:issue_updated]}
    do:
      - id: note
        action: jira.add_comment
        with: {issue: "{{ issue.fields.summary }}", body: "Rolling out **{{ issue.key }}**"}
      - action: jira.transition_issue
        with: {issue: "{{ issue.key }}", transition: Start deploy, comment: "{{ steps.note.id }}"}
      - action: jira.search_issues
        with: {jql: "project = {{ issue.fields.project.key }}", fields: [summary]}
      - action: http.request
        with: {url: "https://hooks.slack.com/services/x?a=1", json: {text: hi}}
"""


def test_the_dry_run_shows_each_actions_main_call(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(DRY_RULES)
    ruleset = load_rules(tmp_path)
    hostile = issue_updated_payload(key="OPS-4", fields={"summary": "../../webhook"})
    text = dry_run(ruleset, hostile, registry=action_registry())
    # The issue key rendered from a field is refused before anything would be sent.
    assert "error: jira.add_comment: '../../webhook' is not an issue key" in text
    assert "POST /rest/api/3/issue/OPS-4/transitions" in text
    assert "<the id of 'Start deploy', from GET .../transitions>" in text
    assert "GET /rest/api/3/search/jql?jql=project+%3D+OPS&maxResults=100&fields=summary" in text
    assert "POST https://hooks.slack.com/services/x?a=1" in text
    payload = issue_updated_payload(key="OPS-4", fields={"summary": "OPS-4"})
    text = dry_run(ruleset, payload, registry=action_registry())
    assert "POST /rest/api/3/issue/OPS-4/comment" in text and '"marks": [' in text
