"""Keep the last good rule set of a folder and reload it when its files change."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Mapping
from pathlib import Path

from bot.errors import RuleError
from bot.rules.loader import ActionSpec, load_rules
from bot.rules.model import RuleSet

log = logging.getLogger(__name__)

_Snapshot = tuple[tuple[str, int, int, int], ...]


class RuleWatcher:
    """Hold the last good RuleSet of `rules_dir`; `check()` reloads it after an edit."""

    def __init__(
        self,
        rules_dir: Path,
        registry: Mapping[str, ActionSpec] | None = None,
        *,
        epic_label_field: str | None = None,
    ) -> None:
        self.rules_dir = rules_dir
        self.registry = registry
        self.epic_label_field = epic_label_field
        self.current: RuleSet = RuleSet.empty(rules_dir)
        self.errors: list[str] = []
        self.loaded = False  # whether a good set was ever installed (readiness)
        self._snapshot: _Snapshot | None = None
        self.check()

    def check(self) -> bool:
        """Reload when the folder changed; return True when a new set was installed."""
        snapshot = self._scan()
        if snapshot == self._snapshot:
            return False
        self._snapshot = snapshot
        try:
            ruleset = load_rules(
                self.rules_dir, self.registry, epic_label_field=self.epic_label_field
            )
        except RuleError as exc:
            self.errors = list(exc.errors)
            for error in self.errors:
                log.warning(
                    "rules not reloaded, keeping version %s: %s", self.current.version[:12], error
                )
            return False
        self.errors = []
        was_loaded, self.loaded = self.loaded, True
        if was_loaded and ruleset.version == self.current.version:
            return False  # touched or reverted to the rules in force: nothing new
        self.current = ruleset
        log.info("rules loaded: %d rules, version %s", len(ruleset.rules), ruleset.version[:12])
        return True

    async def run(self, interval_s: float) -> None:
        """Poll the folder every `interval_s` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                # Loading compiles templates and reads files: keep it off the event loop.
                await asyncio.to_thread(self.check)
            except Exception:  # a bug in one reload must not stop later reloads
                log.exception("rule reload failed")

    def _scan(self) -> _Snapshot:
        # Names, mtimes, sizes and a checksum: an edit that keeps the size within one
        # mtime tick (coarse file-system clocks) still changes the checksum.
        if not self.rules_dir.is_dir():
            return (("", -1, -1, -1),)  # no folder: differs from an empty one
        try:
            paths = sorted(self.rules_dir.glob("*.yaml"))
        except OSError:
            return (("", -1, -1, -1),)  # no folder: differs from an empty one
        entries: list[tuple[str, int, int, int]] = []
        for path in paths:
            try:
                stat = path.stat()
                checksum = zlib.crc32(path.read_bytes())
            except OSError:  # deleted between listing and reading: the next scan sees it
                continue
            entries.append((path.name, stat.st_mtime_ns, stat.st_size, checksum))
        return tuple(entries)
