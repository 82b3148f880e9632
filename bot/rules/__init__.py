"""Rule files: loading and checking, the pure engine, templates, hot reload, dry run."""

from bot.rules.conditions import Condition
from bot.rules.dryrun import DryRunResult, dry_run, format_dry_run, plan_dry_run
from bot.rules.engine import evaluate, matched_webhook_ids
from bot.rules.jql import check_jql
from bot.rules.loader import check_rules, load_rules
from bot.rules.model import Evaluation, Miss, Rule, RuleSet, Step
from bot.rules.templates import build_context, render_params
from bot.rules.watcher import RuleWatcher

__all__ = [
    "Condition",
    "DryRunResult",
    "Evaluation",
    "Miss",
    "Rule",
    "RuleSet",
    "RuleWatcher",
    "Step",
    "build_context",
    "check_jql",
    "check_rules",
    "dry_run",
    "evaluate",
    "format_dry_run",
    "load_rules",
    "matched_webhook_ids",
    "plan_dry_run",
    "render_params",
]
