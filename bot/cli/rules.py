"""Entry functions of `deploybot rules check` and `deploybot rules test` (wired by bot.cli)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from bot.rules.dryrun import dry_run
from bot.rules.loader import ActionSpec, check_rules


def cmd_check(
    rules_dir: Path,
    *,
    registry: Mapping[str, ActionSpec] | None = None,
    http_allowed_hosts: tuple[str, ...] | None = None,
    epic_label_field: str | None = None,
) -> int:
    """Print every error as `file:line: message` and return 1, or a summary and return 0."""
    ruleset, errors = check_rules(
        rules_dir,
        registry,
        http_allowed_hosts=http_allowed_hosts,
        epic_label_field=epic_label_field,
    )
    if ruleset is None:
        for error in errors:
            print(error)
        print(f"{len(errors)} error(s) in {rules_dir}")
        return 1
    files = len({rule.source_file for rule in ruleset.rules})
    print(
        f"{rules_dir}: {len(ruleset.rules)} rule(s) in {files} file(s) OK "
        f"(version {ruleset.version[:12]})"
    )
    return 0


def cmd_test(
    event_path: Path,
    rules_dir: Path,
    *,
    registry: Mapping[str, ActionSpec] | None = None,
    epic_label_field: str | None = None,
) -> int:
    """Print the dry run of the event in `event_path`; 1 when the rules or event are bad."""
    from bot.services.runner import action_registry  # its previews show each main call

    registry = action_registry() if registry is None else registry
    ruleset, errors = check_rules(rules_dir, registry, epic_label_field=epic_label_field)
    if ruleset is None:
        for error in errors:
            print(error)
        return 1
    try:
        payload = json.loads(event_path.read_bytes())
    except (OSError, ValueError) as exc:
        print(f"{event_path}: cannot read the event: {exc}")
        return 1
    if not isinstance(payload, dict):
        print(f"{event_path}: the event must be a JSON object")
        return 1
    print(dry_run(ruleset, payload, registry=registry))
    return 0
