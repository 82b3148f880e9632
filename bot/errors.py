"""The one exception hierarchy of deploybot; only the web layer maps these to statuses."""

from __future__ import annotations


class DeploybotError(Exception):
    """Base of every error deploybot raises on purpose."""


class SettingsError(DeploybotError):
    """A setting is missing or has an invalid value."""


class VerificationError(DeploybotError):
    """A delivery's or callback's token does not prove who sent it (HTTP 401)."""


class PayloadError(DeploybotError):
    """A request body is not what the endpoint accepts (HTTP 400)."""


class UnsupportedMediaType(PayloadError):
    """A request has a content type the endpoint does not accept (HTTP 415)."""


class RequestTimeout(DeploybotError):
    """A client sent its request body too slowly (HTTP 408)."""


class StoreUnavailable(DeploybotError):
    """The database cannot take the write right now (HTTP 503, Jira retries)."""


class RetryRefused(DeploybotError):
    """An action run cannot be retried as asked (HTTP 409); `retry_instead` names the
    earlier run of the same rule that must be retried first, when that is why."""

    def __init__(self, message: str, *, retry_instead: int | None = None) -> None:
        super().__init__(message)
        self.retry_instead = retry_instead


class RuleError(DeploybotError):
    """A rule file or rule set is invalid; carries every error found."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class TemplateRenderError(DeploybotError):
    """A template of an action's parameters failed to render for this event."""


class ActionError(DeploybotError):
    """An action call failed; `retryable` says whether a later attempt may succeed."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class ServiceDisabled(ActionError):
    """The service an action needs has no credentials configured."""
