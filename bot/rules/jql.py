"""Check that a JQL string stays inside what Jira's webhook filter accepts.

Jira's dynamic-webhook `jqlFilter` takes only the fields issueKey, project, issuetype,
status, assignee, reporter, issue.property[...] and cf[id], the operators = != IN NOT IN,
AND / OR and parentheses; of custom fields (`cf[id]`) only the epic label field, whose id
differs per site, so a `cf[id]` is accepted only when it is named as that field
(JIRA_EPIC_LABEL_FIELD). Anything else is refused at registration time, so we refuse it
when the rule file is checked. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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

    def __init__(self, tokens: list[_Token], epic_label: str | None = None) -> None:
        self._tokens = tokens
        self._pos = 0
        self._epic_label = epic_label

    def parse(self) -> None:
        if self._peek().kind == "end":
            raise JqlError("empty query")
        self._expr()
        token = self._peek()
        if token.kind != "end":
            if _is_word(token, "order"):
                raise self._error(token, "ORDER BY is not supported in a webhook filter")
            if token.text == ")":
                raise self._error(token, "unbalanced ')'")
            raise self._error(token, f"expected AND, OR or the end, found {token.text!r}")

    def _expr(self) -> None:
        self._term()
        while _is_word(self._peek(), "or"):
            self._next()
            self._term()

    def _term(self) -> None:
        self._atom()
        while _is_word(self._peek(), "and"):
            self._next()
            self._atom()

    def _atom(self) -> None:
        token = self._next()
        if token.text == "(" and token.kind == "punct":
            self._expr()
            closing = self._next()
            if closing.text != ")":
                raise self._error(closing, f"expected ')', found {_describe(closing)}")
            return
        if _is_word(token, "not"):
            raise self._error(token, "a leading NOT is not supported (use != or NOT IN)")
        if token.kind != "word" or token.text.lower() in _KEYWORDS:
            raise self._error(token, f"expected a field, found {_describe(token)}")
        custom = _CUSTOM_FIELD.fullmatch(token.text)
        if custom is not None and custom[1] != self._epic_label:
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
        self._clause_rest(token)

    def _clause_rest(self, field: _Token) -> None:
        op = self._next()
        if op.kind == "op" and op.text in ("=", "!="):
            self._value(list_allowed=False)
        elif _is_word(op, "in"):
            self._value(list_allowed=True, list_required=True)
        elif _is_word(op, "not") and _is_word(self._peek(), "in"):
            self._next()
            self._value(list_allowed=True, list_required=True)
        elif op.kind == "end":
            raise self._error(op, f"expected an operator after {field.text!r}")
        else:
            raise self._error(
                op,
                f"operator {op.text!r} is not supported in a webhook filter (use = != IN NOT IN)",
            )

    def _value(self, *, list_allowed: bool, list_required: bool = False) -> None:
        token = self._peek()
        if token.kind == "punct" and token.text == "(":
            if not list_allowed:
                raise self._error(token, "a list of values needs IN or NOT IN")
            self._next()
            self._single_value()
            while self._peek().text == "," and self._peek().kind == "punct":
                self._next()
                self._single_value()
            closing = self._next()
            if closing.text != ")":
                raise self._error(closing, f"expected ',' or ')', found {_describe(closing)}")
            return
        if list_required:
            raise self._error(token, "IN and NOT IN take a parenthesised list, e.g. (A, B)")
        self._single_value()

    def _single_value(self) -> None:
        token = self._next()
        if token.kind == "string":
            return
        if token.kind != "word" or token.text.lower() in _KEYWORDS:
            raise self._error(token, f"expected a value, found {_describe(token)}")
        after = self._peek()
        if after.kind == "punct" and after.text == "(":
            raise self._error(token, f"functions such as {token.text}() are not supported")

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
