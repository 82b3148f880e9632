"""Serve the test suite's fake UbiOps on a port, in its own process, for benchmarks.

python -m bench.fake_ubiops --port 8901 --token TOKEN
"""

from __future__ import annotations

import argparse

from aiohttp import web

from tests.fakes.ubiops import FakeUbiOps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--project", default="ml-prod")
    args = parser.parse_args()
    fake = FakeUbiOps(token=args.token, projects=(args.project,), rate_limit_per_minute=10**9)
    web.run_app(fake.app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
