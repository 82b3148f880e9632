"""Template output is bounded: no expression or loop allocates past MAX_RENDERED_CHARS.

A companion of test_template_injection.py: Jira text cannot become template source, but
it can be the count a rule's template repeats by. Each bomb must fail its render with a
reason before it allocates (tracemalloc watches the peak), and end a run dead, on both
engines, with nothing sent.
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.errors import TemplateRenderError
from bot.rules.templates import MAX_RENDERED_CHARS, build_context, render_params
from bot.settings import Settings
from tests.conftest import ClientFactory
from tests.fakes.ubiops import FakeUbiOps
from tests.helpers import TOKEN, event_when_runs_are, headers, issue_updated, template_step

LIST = "ubiops.deployments_list"
PEAK_BYTES = 16 * 1024 * 1024  # every bomb below would take 100 MB or more
BOMBS = [
    "{{ 'x' * 10**8 }}",
    "{{ 10**8 * 'x' }}",
    "{{ [0] * 10**8 }}",
    "{{ issue.fields.summary * issue.fields.customfield_10060 }}",
    "{{ 2 ** 1000000000 }}",
    "{{ 'ab' | center(10**8) }}",
    "{{ 'ab'.ljust(10**8) }}",
    "{{ 'ab'.zfill(10**8) }}",
    "{{ ('x' * 1000) | replace('x', 'y' * 1000) | replace('y', 'zz' * 100) }}",
    "{{ ('x' * 1000).replace('x', 'y' * 1000).replace('y', 'zz' * 100) }}",
    "{{ '%100000000s' | format('x') }}",
    "{{ '%100000000s' % 'x' }}",
    "{{ '%*s' % (100000000, 'x') }}",
    "{{ '{:>100000000}'.format('x') }}",
    "{{ '{:>{}}'.format('x', 10**8) }}",
    "{{ '{0:>100000000}'.format_map({}) }}",
    "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "{{ ('x\n' * 500000) | indent(1000) }}",
]


def _context() -> dict[str, Any]:
    payload = issue_updated("OPS-1", summary="boom")
    payload["issue"]["fields"]["customfield_10060"] = 10**8
    return build_context(payload, event_id="1")


@pytest.mark.parametrize("bomb", BOMBS)
def test_a_template_bomb_fails_before_it_allocates(tmp_path: Path, bomb: str) -> None:
    step = template_step(tmp_path, f"          project_name: {json.dumps(bomb)}\n", LIST)
    tracemalloc.start()
    try:
        with pytest.raises(TemplateRenderError) as failed:
            render_params(step, _context())
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"over {MAX_RENDERED_CHARS} characters" in str(failed.value) or "bits" in str(
        failed.value
    )
    assert peak < PEAK_BYTES


def test_values_up_to_the_bound_still_render(tmp_path: Path) -> None:
    fine = [
        ("{{ 'x' * 1048576 }}", MAX_RENDERED_CHARS),
        ("{{ 'ab' | center(100) }}", 100),
        ("{{ '%5s' % 'x' }}", 5),
        ("{{ 2 ** 64 }}", 20),
        ("{{ '{{}}{}-{:>3}'.format(1700000000000, 'x') }}", 19),
        ("{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}", 1_000_000),
    ]
    for source, size in fine:
        step = template_step(tmp_path, f"          project_name: {json.dumps(source)}\n", LIST)
        # A single expression keeps its type (`2 ** 64` is a number): measure its text.
        assert len(str(render_params(step, _context())["project_name"])) == size


BOMB_RULE = """
rules:
  - name: repeat-by-jira
    on: {events: [jira:issue_updated]}
    do:
      - action: ubiops.deployment_environment_variables_create
        with:
          project_name: ml-prod
          deployment_name: churn
          data:
            name: PAD
            value: "{{ issue.fields.summary * issue.fields.customfield_10060 }}"
            secret: false
"""


async def test_a_bomb_from_jira_ends_the_run_dead_with_a_reason(
    make_client: ClientFactory,
    settings: Settings,
    tmp_path: Path,
    aiohttp_server: Callable[..., Any],
) -> None:
    fake = FakeUbiOps(token=TOKEN)
    url = str((await aiohttp_server(fake.app())).make_url(fake.prefix))
    rules = tmp_path / "bomb-rules"
    rules.mkdir()
    (rules / "bomb.yaml").write_text(BOMB_RULE)
    client = await make_client(
        settings, rules_dir=rules, ubiops_api_url=url, ubiops_api_token=TOKEN
    )
    payload = issue_updated("OPS-1", summary="boom")
    payload["issue"]["fields"]["customfield_10060"] = 10**8
    resp = await client.post("/webhooks/jira", data=json.dumps(payload), headers=headers("bomb"))
    assert resp.status == 202
    shown = await event_when_runs_are(
        settings.database_url, (await resp.json())["event_id"], ["dead"]
    )
    assert "a repetition would be over" in shown["action_runs"][0]["last_error"]
    assert fake.requests == []
