"""What every fake service shares: the record of what it received, and fault injection.

Each fake (UbiOps, Genesys, Jira) keeps `requests` as `RecordedRequest`s and answers
`calls(method, path_regex)`; UbiOps and Genesys inject `Fault`s through one `FaultPlan`
(the next n matching requests, or a seeded fraction), rendering a status fault as their
own service's error body.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class RecordedRequest:
    """One request as a fake received it."""

    method: str
    path: str  # relative to the fake's API base
    query: tuple[tuple[str, str], ...]
    headers: dict[str, str]
    body: bytes
    status: int = 0  # the answer's status, where the fake notes it
    auth_error: str | None = None  # why the fake refused the credentials, if it did

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


async def recorded(request: web.Request, path: str) -> RecordedRequest:
    """`request` as a fake keeps it (`path` relative to the fake's API base)."""
    return RecordedRequest(
        request.method,
        path,
        tuple(request.query.items()),
        dict(request.headers),
        await request.read(),
    )


class Recorder:
    """Keeps every request a fake receives, in order."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []

    async def record(self, request: web.Request, path: str) -> RecordedRequest:
        self.requests.append(await recorded(request, path))
        return self.requests[-1]

    def calls(self, method: str, path_pattern: str) -> list[RecordedRequest]:
        """The recorded requests with this method whose path matches the regex."""
        return [
            r for r in self.requests if r.method == method and re.fullmatch(path_pattern, r.path)
        ]


@dataclass(frozen=True)
class Fault:
    """A failure to inject: an error status, a slow answer, or a dropped connection.

    With `after=True` the request is processed first (state changes) and only the
    answer is lost (or held `delay_s`), the case that makes a retried create meet its
    own first attempt. `method`, `path_contains` and `path_prefix` narrow which requests
    it applies to.
    """

    kind: str = "status"  # "status" | "slow" | "drop"
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    after: bool = False
    method: str | None = None
    path_contains: str | None = None
    path_prefix: str | None = None
    # A careless service quoting the request's Authorization header in its error body.
    echo_authorization: bool = False

    def applies_to(self, request: web.Request) -> bool:
        return (
            (self.method is None or request.method == self.method)
            and (self.path_contains is None or self.path_contains in request.path)
            and (self.path_prefix is None or request.path.startswith(self.path_prefix))
        )

    @property
    def label(self) -> str:
        """Name the fault's kind for counting: "slow", "drop" or the status."""
        return str(self.status) if self.kind == "status" else self.kind


@dataclass(eq=False)
class Injection:
    """Faults planned for matching requests: `count` times, or (count None) a seeded
    `fraction` of them; with several faults, one picked evenly each time."""

    faults: tuple[Fault, ...]
    count: int | None = 1
    fraction: float = 1.0
    rng: random.Random = field(default_factory=random.Random)
    fired: int = 0

    @property
    def kind(self) -> str:
        return self.faults[0].label

    def fires(self, request: web.Request) -> Fault | None:
        """The fault for this request (counted), or None."""
        candidates = [f for f in self.faults if f.applies_to(request)]
        if not candidates:
            return None
        if self.count is not None:
            if self.fired >= self.count:
                return None
        elif self.rng.random() >= self.fraction:
            return None
        self.fired += 1
        return candidates[0] if len(candidates) == 1 else self.rng.choice(candidates)


class FaultPlan:
    """The faults a fake will answer with, first planned first."""

    def __init__(self) -> None:
        self.injections: list[Injection] = []
        self.injected: Counter[str] = Counter()  # faults answered, by `Fault.label`

    def fail_next(self, count: int, fault: Fault) -> Injection:
        """Answer the next `count` matching requests with the fault."""
        return self._add(Injection((fault,), count))

    def fail_fraction(self, fraction: float, fault: Fault, *, seed: int = 0) -> Injection:
        """Answer about `fraction` of the matching requests with the fault (seeded)."""
        return self._add(Injection((fault,), None, fraction, random.Random(seed)))

    def fail_mix(self, fraction: float, faults: Sequence[Fault], *, seed: int = 0) -> Injection:
        """Answer about `fraction` of the requests with one of `faults`, picked evenly."""
        return self._add(Injection(tuple(faults), None, fraction, random.Random(seed)))

    def clear(self) -> None:
        self.injections.clear()

    def next(self, request: web.Request) -> Fault | None:
        """The fault this request meets, if any (counted in `injected`)."""
        for injection in self.injections:
            fault = injection.fires(request)
            if fault is not None:
                self.injected[fault.label] += 1
                return fault
        return None

    def _add(self, injection: Injection) -> Injection:
        self.injections.append(injection)
        return injection
