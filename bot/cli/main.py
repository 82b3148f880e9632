"""The `deploybot` command line (also `python -m bot`)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from bot import logs
from bot import settings as settings_mod
from bot.db import queries
from bot.db.engine import create_engine, upgrade
from bot.db.models import ACTION_STATUSES, EVENT_OUTCOMES, utcnow
from bot.errors import SettingsError
from bot.settings import Settings

log = logging.getLogger("bot")
SWITCH_INTERVAL_S = 0.0005
GC_THRESHOLDS = (20_000, 50, 100)  # gc's defaults: (700, 10, 10)


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value).decode() + "\n")


def _serve(settings: Settings, _args: argparse.Namespace) -> int:
    from aiohttp import web

    from bot.cli.failures import check_sqlite_folder
    from bot.web.app import create_app

    check_sqlite_folder(settings)
    _check_port(settings.host, settings.port)
    log.info("%s", settings.in_use())
    for warning in settings.disabled_features():
        log.warning("%s", warning)
    for note in settings.startup_notes():
        log.info("%s", note)
    app = create_app(settings)
    app.on_shutdown.append(_exit_deadline(settings.shutdown_timeout_s))
    # The event loop shares the GIL with the SQLite write thread: after each socket call
    # the loop waits for the GIL, up to the switch interval (5 ms by default).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    app.on_startup.append(_tune_gc)  # after the cleanup contexts have started
    # SIGTERM: stop listening, let in-flight requests finish (half the budget), then the
    # cleanup contexts stop the workers, give back leases and flush the event store.
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=lambda msg: log.info("%s", msg),
        access_log=None,
        shutdown_timeout=settings.shutdown_timeout_s / 2,
        loop=event_loop(),
    )
    log.info("deploybot stopped")
    return 0


def _check_port(host: str, port: int) -> None:
    """Fail before anything starts when the address cannot be listened on (in use, not
    ours): one line naming the setting, not the traceback of a half-started app."""
    if port == 0:
        return
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
            probe.bind(address)
    except socket.gaierror:
        return  # the server's own bind reports it
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise OSError(exc.errno, f"cannot bind on {host}:{port}: {reason}") from exc


async def _tune_gc(_app: Any) -> None:
    """Collect garbage less often: each delivery allocates many short-lived objects.

    What start-up built (rules, schema, compiled templates) lives as long as the
    process: frozen, later collections skip it (docs/performance.md).
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def event_loop() -> asyncio.AbstractEventLoop:
    """Return a uvloop loop when uvloop is installed (a faster loop), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _exit_deadline(timeout_s: float) -> Callable[[Any], Awaitable[None]]:
    """Return an on_shutdown hook that ends the process if shutdown overruns `timeout_s`."""

    async def arm(_app: Any) -> None:
        def overrun() -> None:
            # Safe: a 2xx was only ever sent after a commit, and leases expire on their own.
            log.error("shutdown took longer than %.1f s: exiting now", timeout_s)
            logging.shutdown()
            os._exit(1)

        timer = threading.Timer(timeout_s, overrun)  # a thread: fires even if the loop hangs
        timer.daemon = True  # a clean exit does not wait for it
        timer.start()

    return arm


def _with_engine(
    work: Callable[[Any], Awaitable[int]],
) -> Callable[[Settings, argparse.Namespace], int]:
    """Run `work(engine)` on a migrated database, disposing the engine afterwards."""

    def run(settings: Settings, _args: argparse.Namespace) -> int:
        from bot.cli.failures import check_sqlite_folder

        check_sqlite_folder(settings)

        async def main() -> int:
            engine = create_engine(settings.database_url)
            try:
                await upgrade(engine)
                return await work(engine)
            finally:
                await engine.dispose()

        return asyncio.run(main())

    return run


def _db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    async def done(_engine: Any) -> int:
        print(f"database is up to date: {_redact_url(settings.database_url)}")
        return 0

    return _with_engine(done)(settings, args)


def _redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest


def _events_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(engine: Any) -> int:
        rows = await queries.list_events(
            engine, status=args.status, limit=args.limit, outcome=args.outcome
        )
        if rows and not args.json:
            print(
                f"{'id':>8}  {'status':<10}  {'outcome':<9}  {'received_at':<32}  "
                f"{'webhook_event':<24}  {'issue':<12}  delivery_id"
            )
        for row in rows:
            if args.json:
                _print_json(row)
            else:
                print(
                    f"{row['id']:>8}  {row['status']:<10}  {row['outcome'] or '-':<9}  "
                    f"{row['received_at']:<32}  "
                    f"{row['webhook_event']:<24}  {row['issue_key'] or '-':<12}  "
                    f"{row['delivery_id']}"
                )
        if not args.json:
            print(f"{len(rows)} event(s)", file=sys.stderr)
        return 0

    return _with_engine(work)(settings, args)


def _events_show(settings: Settings, args: argparse.Namespace) -> int:
    async def work(engine: Any) -> int:
        event = await queries.get_event(engine, args.id)
        if event is None:
            print(f"deploybot: no event {args.id}", file=sys.stderr)
            return 1
        if args.json:
            _print_json(event)
            return 0
        for key in (
            "id",
            "delivery_id",
            "tenant",
            "webhook_event",
            "issue_key",
            "status",
            "outcome",
            "received_at",
            "processed_at",
            "attempts",
            "error",
            "ruleset_version",
        ):
            print(f"{key:>16}: {event[key] if event[key] is not None else '-'}")
        print("rule matches:" if event["matches"] else "rule matches: none recorded")
        for m in event["matches"]:
            why = f": {m['reason']}" if m["reason"] else ""  # a match has no reason to give
            print(f"  {'MATCH' if m['matched'] else 'miss ':<5} {m['rule']}{why}")
        print("action runs:" if event["action_runs"] else "action runs: none")
        for r in event["action_runs"]:
            print(
                f"  {r['rule']}#{r['step']} {r['action']}: {r['status']} "
                f"(attempts {r['attempts']}){' - ' + r['last_error'] if r['last_error'] else ''}"
            )
            if r.get("waiting_for"):
                print(f"    waiting for {r['waiting_for']}")
            if r["status"] == "waiting" and r["result"] is not None:
                answer = orjson.dumps(r["result"], default=str).decode()
                print(f"    last answer: {answer[:200]}{'...' if len(answer) > 200 else ''}")
        print("payload:")
        print(_pretty_payload(event["payload"]))
        return 0

    return _with_engine(work)(settings, args)


def _pretty_payload(text: str) -> str:
    """The stored body, indented when it is JSON (it is kept as Jira sent it)."""
    try:
        return orjson.dumps(orjson.loads(text), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return text


def _events_replay(settings: Settings, args: argparse.Namespace) -> int:
    from bot.pipeline import replay

    try:
        since = replay.parse_since(args.since, utcnow()) if args.since else None
        selection = replay.Selection(ids=args.ids, status=args.status, since=since)
    except ValueError as exc:
        print(f"deploybot: {exc}", file=sys.stderr)
        return 2

    async def work(engine: Any) -> int:
        outcome = await replay.replay(engine, selection)
        for event_id in outcome.missing:
            print(f"deploybot: no event {event_id}", file=sys.stderr)
        if outcome.busy:
            print(f"left alone (being processed): {outcome.busy}", file=sys.stderr)
        print(
            f"replayed {len(outcome.replayed)} event(s);"
            f" {outcome.runs_reset} dead or skipped action run(s) back to pending"
        )
        return 1 if outcome.missing else 0

    return _with_engine(work)(settings, args)


def _runs_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(engine: Any) -> int:
        rows = await queries.list_action_runs(engine, status=args.status, limit=args.limit)
        for row in rows:
            if args.json:
                _print_json(row)
                continue
            error = f"  {row['last_error']}" if row["last_error"] else ""
            print(
                f"{row['id']:>8}  {row['status']:<9}  event {row['event_id']:<8}"
                f"  {row['issue_key'] or '-':<12}  {row['rule']}#{row['step'] + 1}"
                f"  {row['action']}  attempts {row['attempts']}{error}"
            )
        if not args.json:
            print(f"{len(rows)} action run(s)", file=sys.stderr)
        return 0

    return _with_engine(work)(settings, args)


def _runs_retry(settings: Settings, args: argparse.Namespace) -> int:
    from bot.db.outcomes import set_outcomes
    from bot.errors import RetryRefused

    async def work(engine: Any) -> int:
        now = utcnow()
        try:
            result = await queries.retry_action_run(engine, args.id, now)
        except RetryRefused as exc:  # not dead/skipped, or behind an earlier step's failure
            print(f"deploybot: {exc}", file=sys.stderr)
            return 1
        if result is None:
            print(f"deploybot: no action run {args.id}", file=sys.stderr)
            return 1
        old_status, queued = result
        await set_outcomes(engine, queued, now)
        print(f"action run(s) {', '.join(map(str, queued))} back to pending (was {old_status})")
        return 0

    return _with_engine(work)(settings, args)


def _rules_check(settings: Settings, args: argparse.Namespace) -> int:
    from bot.cli.rules import cmd_check

    return cmd_check(
        args.dir or settings.rules_dir,
        http_allowed_hosts=settings.http_allowed_hosts,
        epic_label_field=settings.jira_epic_label_field,
    )


def _rules_test(settings: Settings, args: argparse.Namespace) -> int:
    from bot.cli.rules import cmd_test

    return cmd_test(
        args.event,
        args.rules or settings.rules_dir,
        epic_label_field=settings.jira_epic_label_field,
    )


def _actions_list(_settings: Settings, args: argparse.Namespace) -> int:
    from bot.cli import actions

    if args.markdown:
        sys.stdout.write(actions.markdown())
    else:
        for line in actions.text_lines():
            print(line)
    return 0


def _webhooks_sync(settings: Settings, _args: argparse.Namespace) -> int:
    from bot.cli.webhooks import cmd_sync

    return cmd_sync(settings)


def _webhooks_list(settings: Settings, args: argparse.Namespace) -> int:
    from bot.cli.webhooks import cmd_list

    return cmd_list(settings, args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deploybot", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("serve", help="run the web server, workers and scheduler").set_defaults(
        run=_serve
    )

    rules = commands.add_parser("rules", help="rule files").add_subparsers(
        dest="rules_command", required=True
    )
    check = rules.add_parser("check", help="validate rule files; print file:line: message")
    check.add_argument("dir", nargs="?", type=Path, help="rules folder (default: settings)")
    check.set_defaults(run=_rules_check)
    dry = rules.add_parser("test", help="dry run: which rules match an event, what they'd call")
    dry.add_argument("event", type=Path, help="a Jira webhook payload (JSON file)")
    dry.add_argument("--rules", type=Path, help="rules folder (default: settings)")
    dry.set_defaults(run=_rules_test)

    acts = commands.add_parser("actions", help="the actions a rule can call").add_subparsers(
        dest="actions_command", required=True
    )
    acts_list = acts.add_parser("list", help="every action with its parameters")
    acts_list.add_argument(
        "--markdown", action="store_true", help="the reference, as in docs/actions.md"
    )
    acts_list.set_defaults(run=_actions_list)

    db = commands.add_parser("db", help="database").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="apply migrations").set_defaults(run=_db_upgrade)

    ev = commands.add_parser("events", help="stored events").add_subparsers(
        dest="events_command", required=True
    )
    ev_list = ev.add_parser("list", help="list stored events, newest first")
    ev_list.add_argument("--status", choices=["received", "processing", "processed", "failed"])
    ev_list.add_argument("--outcome", choices=EVENT_OUTCOMES)
    ev_list.add_argument("--limit", type=int, default=None)
    ev_list.add_argument("--json", action="store_true", help="one JSON object per line")
    ev_list.set_defaults(run=_events_list)
    ev_show = ev.add_parser("show", help="one event with its rule matches and action runs")
    ev_show.add_argument("id", type=int)
    ev_show.add_argument("--json", action="store_true")
    ev_show.set_defaults(run=_events_show)
    ev_replay = ev.add_parser("replay", help="run stored events again (conditions combine)")
    ev_replay.add_argument("ids", nargs="*", type=int, metavar="ID")
    ev_replay.add_argument("--status", choices=["received", "processed", "failed"])
    ev_replay.add_argument("--since", help="received at or after: ISO 8601 time, or 30m, 2h, 7d")
    ev_replay.set_defaults(run=_events_replay)

    runs = commands.add_parser("runs", help="action runs").add_subparsers(
        dest="runs_command", required=True
    )
    runs_list = runs.add_parser("list", help="action runs, most recently changed first")
    runs_list.add_argument("--status", choices=ACTION_STATUSES)
    runs_list.add_argument("--limit", type=int, default=None)
    runs_list.add_argument("--json", action="store_true", help="one JSON object per line")
    runs_list.set_defaults(run=_runs_list)
    runs_retry = runs.add_parser("retry", help="a dead run and the skipped steps after it")
    runs_retry.add_argument("id", type=int)
    runs_retry.set_defaults(run=_runs_retry)

    hooks = commands.add_parser("webhooks", help="Jira dynamic webhooks").add_subparsers(
        dest="webhooks_command", required=True
    )
    hooks.add_parser("sync", help="register what the rules need, delete the rest").set_defaults(
        run=_webhooks_sync
    )
    hooks_list = hooks.add_parser("list", help="registered webhooks: JQL, events, expiry")
    hooks_list.add_argument("--json", action="store_true", help="one JSON object per line")
    hooks_list.set_defaults(run=_webhooks_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_mod.from_env()
    except SettingsError as exc:
        print(f"deploybot: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings)  # JSON lines (text on a terminal), secrets redacted
    try:
        result: int = args.run(settings, args)
    except SettingsError as exc:
        print(f"deploybot: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from bot.cli.failures import describe

        line = describe(exc, settings)
        if line is None:
            raise
        print(f"deploybot: {line}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
