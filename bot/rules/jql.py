"""Check that a JQL string stays inside what Jira's webhook filter accepts.

Jira's dynamic-webhook `jqlFilter` takes only the fields issueKey, project, issuetype,
status, assignee, reporter, issue.property[...] and cf[id], the operators = != IN NOT IN,
AND / OR and parentheses; of custom fields (`cf[id]`) only the epic label field, whose id
differs per site, so a `cf[id]` is accepted only when it is named as that field
(JIRA_EPIC_LABEL_FIELD). Anything else is refused at registration time, so we refuse it
when the rule file is checked. Pure: no I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SUPPORTED_FIELDS_TEXT = (
    "issueKey, project, issuetype, status, assignee, reporter, issue.property[...], and cf[NNNNN]"
    " for the epic label field"
)
_CUSTOM_FIELD = re.compile(r"cf\[(\d+)\]", re.IGNORECASE)
_PLAIN_FIELDS = frozenset({"issuekey", "project", "issuetype", "status", "assignee", "reporter"})
_FIELD_PATTERNS = (re.compile(r"issue\.property\[[^\[\]\s]+\](\.[\w-]+)*", re.IGNORECASE),)
# Words that end a value or start something the webhook filter cannot take.
_KEYWORDS = frozenset({"and", "or", "not", "in", "order", "by", "is", "was", "changed"})
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<badstring>["'])
      | (?P<op>!=|!~|>=|<=|=|~|>|<)
      | (?P<punct>[(),])
      | (?P<word>[^\s"'(),=!~<>]+)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # string | op | punct | word | end
    text: str
    column: int  # 1-based


class JqlError(ValueError):
    """A JQL string Jira's webhook filter would refuse."""


def epic_label_id(field: str | None) -> str | None:
    """The numeric id of the epic label field from `customfield_10011`, `cf[10011]` or
    `10011`; None when not set or not such a name."""
    if not field:
        return None
    found = re.fullmatch(r"(?:customfield_|cf\[)?(\d+)\]?", field.strip(), re.IGNORECASE)
    return found[1] if found else None


def check_jql(jql: str, *, epic_label_field: str | None = None) -> str | None:
    """Return why Jira's webhook filter cannot take `jql`, or None when it can.

    `epic_label_field` names the site's epic label custom field, the one `cf[id]` the
    filter takes."""
    try:
        _Parser(_tokenize(jql), epic_label_id(epic_label_field)).parse()
    except JqlError as exc:
        return str(exc)
    return None


@dataclass(frozen=True, slots=True)
class Clause:
    """`field op values`: op is one of = != IN NOT IN (values: one for = and !=)."""

    field: str
    op: str
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Junction:
    """AND / OR of parts."""

    op: str  # "and" | "or"
    parts: tuple[Any, ...]


@functools.lru_cache(maxsize=4096)
def parse_jql(jql: str) -> Clause | Junction:
    """Parse a webhook-filter JQL (raises JqlError when Jira would refuse it)."""
    parser = _Parser(_tokenize(jql), any_custom=True)
    parser.parse()
    assert parser.tree is not None
    return parser.tree


class Undecided(Exception):
    """The payload does not carry what a clause reads (e.g. an issue property)."""


def jql_holds(jql: str, payload: Mapping[str, Any]) -> bool:
    """Decide a webhook-filter JQL on the delivery's own issue, as Jira would.

    Raises Undecided when the payload lacks a field the query reads, JqlError when the
    query is not one Jira's webhook filter takes.
    """
    issue = payload.get("issue")
    if not isinstance(issue, Mapping):
        raise Undecided("the event carries no issue")
    return _holds(parse_jql(jql), issue)


def _holds(node: Clause | Junction, issue: Mapping[str, Any]) -> bool:
    if isinstance(node, Junction):
        results = (_holds(part, issue) for part in node.parts)
        return all(results) if node.op == "and" else any(results)
    actual = _issue_values(node.field, issue)
    wanted = {v.casefold() for v in node.values}
    empty = bool(wanted & {"empty", "null"})
    if actual is None:  # empty: only `= EMPTY` holds; != and NOT IN never match empties
        return empty and node.op in ("=", "in")
    hit = bool(actual & wanted)
    return hit if node.op in ("=", "in") else not hit


def _issue_values(name: str, issue: Mapping[str, Any]) -> set[str] | None:
    """The texts a clause on `name` may match (key, name, id), None when empty."""
    lowered = name.lower()
    if lowered == "issuekey":
        key, ident = issue.get("key"), issue.get("id")
        found = {str(v).casefold() for v in (key, ident) if isinstance(v, str | int)}
        if not found:
            raise Undecided("the event's issue has no key")
        return found
    fields = issue.get("fields")
    if not isinstance(fields, Mapping):
        raise Undecided("the event's issue carries no fields")
    if lowered.startswith("issue.property"):
        raise Undecided(f"{name}: issue properties are not in the event")
    key = "customfield_" + lowered[3:-1] if lowered.startswith("cf[") else lowered
    if key not in fields:
        raise Undecided(f"{name}: the event does not carry this field")
    return _texts(fields[key])


_IDENTITY_KEYS = ("key", "name", "id", "value", "accountId", "emailAddress", "displayName")


def _texts(value: Any) -> set[str] | None:
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, list):
        found: set[str] = set()
        for item in value:
            found |= _texts(item) or set()
        return found or None
    if isinstance(value, Mapping):
        return {
            str(value[k]).casefold()
            for k in _IDENTITY_KEYS
            if isinstance(value.get(k), str | int) and not isinstance(value.get(k), bool)
        } or None
    return {str(value).casefold()}


def _tokenize(jql: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while True:
        while pos < len(jql) and jql[pos].isspace():
            pos += 1
        if pos >= len(jql):
            tokens.append(_Token("end", "", pos + 1))
            return tokens
        match = _TOKEN.match(jql, pos)
        if match is None or match.lastgroup is None:  # pragma: no cover - the word class is total
            raise JqlError(f"column {pos + 1}: cannot read {jql[pos:]!r}")
        if match.lastgroup == "badstring":
            raise JqlError(f"column {pos + 1}: unterminated quoted string")
        kind = match.lastgroup
        tokens.append(_Token(kind, match.group(kind), match.start(kind) + 1))
        pos = match.end()


class _Parser:
    """Recursive descent over: expr := term (OR term)*; term := atom (AND atom)*."""

    def __init__(
        self, tokens: list[_Token], epic_label: str | None = None, *, any_custom: bool = False
    ) -> None:
        self._tokens = tokens
        self._pos = 0
        self._epic_label = epic_label
        self._any_custom = any_custom  # deciding a loaded rule's JQL: `check_jql` passed it
        self.tree: Clause | Junction | None = None

    def parse(self) -> None:
        if self._peek().kind == "end":
            raise JqlError("empty query")
        self.tree = self._expr()
        token = self._peek()
        if token.kind != "end":
            if _is_word(token, "order"):
                raise self._error(token, "ORDER BY is not supported in a webhook filter")
            if token.text == ")":
                raise self._error(token, "unbalanced ')'")
            raise self._error(token, f"expected AND, OR or the end, found {token.text!r}")

    def _expr(self) -> Clause | Junction:
        parts = [self._term()]
        while _is_word(self._peek(), "or"):
            self._next()
            parts.append(self._term())
        return parts[0] if len(parts) == 1 else Junction("or", tuple(parts))

    def _term(self) -> Clause | Junction:
        parts = [self._atom()]
        while _is_word(self._peek(), "and"):
            self._next()
            parts.append(self._atom())
        return parts[0] if len(parts) == 1 else Junction("and", tuple(parts))

    def _atom(self) -> Clause | Junction:
        token = self._next()
        if token.text == "(" and token.kind == "punct":
            inner = self._expr()
            closing = self._next()
            if closing.text != ")":
                raise self._error(closing, f"expected ')', found {_describe(closing)}")
            return inner
        if _is_word(token, "not"):
            raise self._error(token, "a leading NOT is not supported (use != or NOT IN)")
        if token.kind != "word" or token.text.lower() in _KEYWORDS:
            raise self._error(token, f"expected a field, found {_describe(token)}")
        custom = _CUSTOM_FIELD.fullmatch(token.text)
        if custom is not None and custom[1] != self._epic_label and not self._any_custom:
            known = (
                f"the epic label field is cf[{self._epic_label}]"
                if self._epic_label
                else "set JIRA_EPIC_LABEL_FIELD to its id if this is it"
            )
            raise self._error(
                token,
                f"custom field {token.text!r}: Jira's webhook filter takes only the epic"
                f" label custom field ({known}); test other fields in `when:`",
            )
        if custom is None and not _is_supported_field(token.text):
            raise self._error(
                token,
                f"field {token.text!r} is not supported in a webhook filter "
                f"(supported: {SUPPORTED_FIELDS_TEXT})",
            )
        return self._clause_rest(token)

    def _clause_rest(self, field: _Token) -> Clause:
        op = self._next()
        if op.kind == "op" and op.text in ("=", "!="):
            return Clause(field.text, op.text, self._value(list_allowed=False))
        if _is_word(op, "in"):
            return Clause(field.text, "in", self._value(list_allowed=True, list_required=True))
        if _is_word(op, "not") and _is_word(self._peek(), "in"):
            self._next()
            return Clause(field.text, "not in", self._value(list_allowed=True, list_required=True))
        if op.kind == "end":
            raise self._error(op, f"expected an operator after {field.text!r}")
        raise self._error(
            op,
            f"operator {op.text!r} is not supported in a webhook filter (use = != IN NOT IN)",
        )

    def _value(self, *, list_allowed: bool, list_required: bool = False) -> tuple[str, ...]:
        token = self._peek()
        if token.kind == "punct" and token.text == "(":
            if not list_allowed:
                raise self._error(token, "a list of values needs IN or NOT IN")
            self._next()
            values = [self._single_value()]
            while self._peek().text == "," and self._peek().kind == "punct":
                self._next()
                values.append(self._single_value())
            closing = self._next()
            if closing.text != ")":
                raise self._error(closing, f"expected ',' or ')', found {_describe(closing)}")
            return tuple(values)
        if list_required:
            raise self._error(token, "IN and NOT IN take a parenthesised list, e.g. (A, B)")
        return (self._single_value(),)

    def _single_value(self) -> str:
        token = self._next()
        if token.kind == "string":
            return re.sub(r"\\(.)", r"\1", token.text[1:-1])  # unquote, unescape
        if token.kind != "word" or token.text.lower() in _KEYWORDS:
            raise self._error(token, f"expected a value, found {_describe(token)}")
        after = self._peek()
        if after.kind == "punct" and after.text == "(":
            raise self._error(token, f"functions such as {token.text}() are not supported")
        return token.text

    def _peek(self) -> _Token:
        return self._tokens[self._pos]

    def _next(self) -> _Token:
        token = self._tokens[self._pos]
        if token.kind != "end":
            self._pos += 1
        return token

    @staticmethod
    def _error(token: _Token, message: str) -> JqlError:
        return JqlError(f"column {token.column}: {message}")


def _is_word(token: _Token, word: str) -> bool:
    return token.kind == "word" and token.text.lower() == word


def _is_supported_field(name: str) -> bool:
    return name.lower() in _PLAIN_FIELDS or any(p.fullmatch(name) for p in _FIELD_PATTERNS)


def _describe(token: _Token) -> str:
    return "the end of the query" if token.kind == "end" else repr(token.text)
