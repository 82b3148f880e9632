"""Secrets that pass through actions, masked wherever they are stored or shown.

Two kinds (DESIGN.md "Trust boundaries": secrets are held by reference):
- a `secret: true` environment variable's value, written in a rule (UbiOps' environment
  variable create/update): the stored run keeps the mask, and the executor takes the value
  from the rule set in force when it renders the call (`needs_rule_params`);
- tokens an operation returns (Genesys' guest-token exchange and refresh, and any value
  under a credential's name in any answer): masked in the stored result, so neither a
  page, `events show`, the admin API nor a later step's template sees them.
Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

MASK = "********"

# UbiOps' environment variable writes, in every scope (project, deployment, version).
_ENV_VAR_WRITE = re.compile(r"ubiops\.\w*environment_variables_(create|update)")
# Answer keys whose text value is a credential, compared without case, `_` or `-`.
_CREDENTIAL_KEYS = frozenset(
    {
        "jwt",
        "token",
        "accesstoken",
        "refreshtoken",
        "idtoken",
        "secret",
        "clientsecret",
        "sharedsecret",
        "password",
    }
)
_MARKERS = ("{{", "{%", "{#")
# Every credential key holds one of these once lowered and stripped of `_` and `-`.
_CREDENTIAL_PARTS = (b"jwt", b"token", b"secret", b"password")


def _secret_value_holder(action: str, params: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The `data` of an environment variable write marked secret (or maybe secret: a
    template decides), else None."""
    if not _ENV_VAR_WRITE.fullmatch(action):
        return None
    data = params.get("data")
    if not isinstance(data, Mapping):
        return None
    secret = data.get("secret")
    maybe = secret is True or (isinstance(secret, str) and any(m in secret for m in _MARKERS))
    return data if maybe and "value" in data else None


def mask_params(action: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` (a step's `with:`) as it may be stored: a secret value written literally
    in the rule is masked (a template is not a secret: it renders from the event)."""
    data = _secret_value_holder(action, params)
    if data is None:
        return dict(params)
    value = data["value"]
    if isinstance(value, str) and any(m in value for m in _MARKERS):
        return dict(params)
    return {**params, "data": {**data, "value": MASK}}


def needs_rule_params(action: str, params: Mapping[str, Any]) -> bool:
    """Whether stored `params` hold a masked secret, to be taken from the rule in force."""
    data = _secret_value_holder(action, params)
    return data is not None and data.get("value") == MASK


def mask_rendered(action: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Rendered parameters as they may be shown (a dry run): the secret value masked."""
    data = _secret_value_holder(action, params)
    if data is None or data.get("secret") is not True:
        return dict(params)
    return {**params, "data": {**data, "value": MASK}}


def _credential_key(key: object) -> bool:
    return isinstance(key, str) and key.lower().replace("_", "").replace("-", "") in (
        _CREDENTIAL_KEYS
    )


def _may_hold_credential(value: Any) -> bool:
    """False when no key of `value` can name a credential: one pass in C over its JSON
    (most answers, say a created version, name none), against a walk of every key."""
    try:
        text = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):  # not plain JSON: walk it
        return True
    text = text.lower().replace(b"_", b"").replace(b"-", b"")
    return any(part in text for part in _CREDENTIAL_PARTS)


def mask_result(value: Any) -> Any:
    """An action's answer as it may be stored: text under a credential's name masked."""
    if isinstance(value, Mapping | list) and not _may_hold_credential(value):
        return value
    return _masked(value)


def _masked(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            k: MASK if _credential_key(k) and isinstance(v, str) and v else _masked(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return value
