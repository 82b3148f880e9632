"""Serve the test suite's fake UbiOps on a port, in its own process, for benchmarks.

python -m bench.fake_ubiops --port 8901 --token TOKEN [--post-delay-s S]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from tests.fakes.ubiops import FakeUbiOps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--project", default="ml-prod")
    # Slow creates keep action runs in flight (bench/recovery.py kills deploybot then).
    parser.add_argument("--post-delay-s", type=float, default=0.0)
    args = parser.parse_args()
    fake = FakeUbiOps(token=args.token, projects=(args.project,), rate_limit_per_minute=10**9)
    app = fake.app()
    # When each version's create arrived (monotonic clock, shared by the host's processes):
    # bench/pipeline.py's reaction time is this minus its delivery's 202.
    arrivals: dict[str, float] = {}

    @web.middleware
    async def arrival(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.method == "POST" and request.path.endswith("/versions"):
            at = time.monotonic()
            version = str((await request.json()).get("version", ""))
            arrivals.setdefault(version, at)
        return await handler(request)

    async def show_arrivals(request: web.Request) -> web.Response:
        return web.json_response(arrivals)

    async def count_arrivals(request: web.Request) -> web.Response:
        return web.json_response(len(arrivals))

    app.middlewares.append(arrival)
    app.router.add_get("/bench/arrivals", show_arrivals)
    app.router.add_get("/bench/arrivals/count", count_arrivals)
    if args.post_delay_s:
        delay = args.post_delay_s

        @web.middleware
        async def slow_posts(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if request.method == "POST" and "/versions" in request.path:
                await asyncio.sleep(delay)
            return await handler(request)

        app.middlewares.append(slow_posts)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
