"""Which hosts `http.request` may call: the allow-list check, shared by `rules check` and
the executor."""

from __future__ import annotations

from urllib.parse import urlsplit


def host_problem(url: str, allowed: tuple[str, ...]) -> str | None:
    """Why `url` may not be called (None: it may). An entry without a port allows any."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{url!r} is not a URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http(s) URL"
    if parts.username is not None or parts.password is not None:
        return "credentials in the URL are refused (send them in headers)"
    host = parts.hostname.lower().rstrip(".")
    if host in allowed or (port is not None and f"{host}:{port}" in allowed):
        return None
    listed = ", ".join(allowed) if allowed else "none (DEPLOYBOT_HTTP_ALLOWED_HOSTS is empty)"
    return f"host {host!r} is not in DEPLOYBOT_HTTP_ALLOWED_HOSTS (allowed: {listed})"
