"""Jinja2 templates of `with:` parameters: compiled once, rendered per action run.

The environment is sandboxed with strict undefined (a missing field fails the run
instead of becoming ""), and values from Jira are only ever passed as data: a rendered
result is never rendered again, so a summary holding "{{ 7*7 }}" stays literal.
"""

from __future__ import annotations

import functools
import os.path
import re
from collections.abc import Callable, Mapping
from typing import Any

from jinja2 import StrictUndefined, Template, Undefined, meta, nodes, pass_eval_context
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from bot.errors import TemplateRenderError
from bot.rules.model import Step

_MARKERS = ("{{", "{%", "{#")
# One rendered value: the services' fields are far smaller (Genesys refuses bodies over
# 500 kB). Checked before anything that could allocate more, and on the output stream.
MAX_RENDERED_CHARS = 1024 * 1024
_MAX_INT_BITS = 64 * 1024  # `10 ** 10 ** 8` would take minutes of CPU
_WIDE_FORMAT = re.compile(r"\d{7,}|%[-#0 +]*\*")  # a width of a million, or one from args
_NESTED_FIELD = re.compile(r"\{[^{}]*\{")
_PADDING_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})


def _too_big(what: str) -> SecurityError:
    return SecurityError(f"{what} would be over {MAX_RENDERED_CHARS} characters")


def _check_replace(text: Any, old: Any, new: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        grows = len(new) - len(old)
        count = text.count(old) if old else len(text) + 1
        if grows > 0 and len(text) + count * grows > MAX_RENDERED_CHARS:
            raise _too_big("replace")


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _WIDE_FORMAT.search(fmt):
        raise _too_big("a format with that width")


class _BoundedSandbox(SandboxedEnvironment):
    """The sandbox, with what one expression can allocate bounded (`'x' * 10**8`)."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                sized = isinstance(seq, str | bytes | list | tuple) and isinstance(times, int)
                if sized and len(seq) * times > MAX_RENDERED_CHARS:
                    raise _too_big("a repetition")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(left) > 1 and left.bit_length() * right > _MAX_INT_BITS:
                raise SecurityError(f"a power over {_MAX_INT_BITS} bits")
        elif operator == "%":
            _check_format(left)
        return super().call_binop(context, operator, left, right)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        bound_to = getattr(obj, "__self__", None)
        name = getattr(obj, "__name__", "")
        if isinstance(bound_to, str):
            if name in _PADDING_METHODS and any(
                isinstance(a, int) and a > MAX_RENDERED_CHARS for a in (*args, *kwargs.values())
            ):
                raise _too_big(f"str.{name}")
            if name == "replace" and len(args) >= 2:
                _check_replace(bound_to, args[0], args[1])
        return super().call(context, obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # str.format is wrapped when it is read, before any call: check its widths there.
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            fmt = value.__self__.replace("{{", "").replace("}}", "")
            _check_format(fmt.replace("{", "%"))
            if _NESTED_FIELD.search(fmt):
                raise _too_big("a format with a width from its arguments")
        return wrapped


def _bounded_filters(env: SandboxedEnvironment) -> None:
    """The built-in filters that can multiply their input's size, bounded likewise."""
    center, indent = env.filters["center"], env.filters["indent"]
    replace, fmt = env.filters["replace"], env.filters["format"]

    def bounded_center(value: Any, width: int = 80) -> Any:
        if isinstance(width, int) and width > MAX_RENDERED_CHARS:
            raise _too_big("center")
        return center(value, width)

    def bounded_indent(s: Any, width: Any = 4, *args: Any, **kwargs: Any) -> Any:
        prefix = len(width) if isinstance(width, str) else width
        if isinstance(prefix, int) and (str(s).count("\n") + 1) * prefix > MAX_RENDERED_CHARS:
            raise _too_big("indent")
        return indent(s, width, *args, **kwargs)

    @pass_eval_context
    def bounded_replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: Any = None) -> Any:
        _check_replace(str(s), str(old), str(new))
        return replace(eval_ctx, s, old, new, count)

    def bounded_format(value: Any, *args: Any, **kwargs: Any) -> Any:
        _check_format(value)
        return fmt(value, *args, **kwargs)

    env.filters.update(
        center=bounded_center, indent=bounded_indent, replace=bounded_replace, format=bounded_format
    )


_ENV = _BoundedSandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
_bounded_filters(_ENV)


def is_template(text: str) -> bool:
    """Return whether `text` holds Jinja syntax (other strings are taken literally)."""
    return any(marker in text for marker in _MARKERS)


@functools.lru_cache(maxsize=8192)
def compile_template(source: str) -> Template | Expression:
    """Compile `source` (cached: a reload re-uses unchanged templates).

    A template that is one `{{ expr }}` and nothing else becomes an Expression, which
    keeps its value's type; any text around it makes a string template.
    """
    expression = single_expression(source)
    if expression is not None:
        return Expression(source, _ENV.compile_expression(expression, undefined_to_none=False))
    return _ENV.from_string(source)


def single_expression(source: str) -> str | None:
    """Return the expression of a template that is exactly one `{{ expr }}`, else None."""
    stripped = source.strip()
    if not (stripped.startswith("{{") and stripped.endswith("}}")):
        return None
    body = _ENV.parse(source).body
    if len(body) != 1 or not isinstance(body[0], nodes.Output):
        return None
    parts = body[0].nodes
    if len(parts) != 1 or isinstance(parts[0], nodes.TemplateData):
        return None
    inner = stripped[2:-2]
    # Whitespace control (`{{- x -}}`) belongs to the delimiters, not the expression.
    return inner.strip("-+").strip()


class Expression:
    """A compiled single-expression template: renders to a value of any JSON type.

    Only rule text is ever compiled; the value is data from the context, returned as is
    (never parsed from text), so Jira's "[1, 2]" stays a string.
    """

    __slots__ = ("_compiled", "source")

    def __init__(self, source: str, compiled: Any) -> None:
        self.source = source
        self._compiled = compiled

    def render(self, context: Mapping[str, Any]) -> Any:
        value = self._compiled(**context)
        if isinstance(value, Undefined):
            value._fail_with_undefined_error()  # raises: strict, like string templates
        return _plain(value)


def _plain(value: Any) -> Any:
    """A JSON-shaped copy of `value`; other objects become their text."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return str(value)  # Markup and other str subclasses become plain text
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def _attribute_name(node: nodes.Getattr | nodes.Getitem) -> str | None:
    """The attribute or constant key `node` reads (`x.name`, `x['name']`), else None."""
    if isinstance(node, nodes.Getattr):
        return node.attr
    arg = node.arg
    return arg.value if isinstance(arg, nodes.Const) and isinstance(arg.value, str) else None


def inspect_template(source: str) -> tuple[list[str], list[str]]:
    """Return the step ids `source` reads as `steps.X` / `steps['X']`, in order, and the
    private names (`_x`) it reaches for, which the sandbox would refuse when rendering."""
    steps: list[str] = []
    private: list[str] = []
    for node in _ENV.parse(source).find_all((nodes.Getattr, nodes.Getitem)):
        assert isinstance(node, nodes.Getattr | nodes.Getitem)
        name = _attribute_name(node)
        if name is None:
            continue
        if name.startswith("_"):
            private.append(name)
        target = node.node
        if isinstance(target, nodes.Name) and target.name == "steps":
            steps.append(name)
    private.reverse()  # the walk meets `a._x._y` outermost first
    return steps, private


def root_names(source: str) -> set[str]:
    """Return the top-level names `source` reads (`issue`, `steps`, `result`, ...)."""
    return set(meta.find_undeclared_variables(_ENV.parse(source)))


def compile_tree(value: Any) -> Any:
    """Return `value` with every template string replaced by its compiled template."""
    if isinstance(value, Mapping):
        return {key: compile_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [compile_tree(item) for item in value]
    if isinstance(value, str) and is_template(value):
        return compile_template(value)
    return value


def build_context(
    payload: Mapping[str, Any],
    *,
    event_id: str,
    received_at: Any = None,
    steps: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the template context: the payload plus `event` and `steps`."""
    return {
        **payload,
        "event": {"id": event_id, "received_at": received_at},
        "steps": dict(steps or {}),
    }


def render_params(step: Step, context: Mapping[str, Any]) -> dict[str, Any]:
    """Render a step's `with:` for one run; `file` parameters become absolute paths."""
    compiled = step.compiled if step.compiled is not None else compile_tree(step.with_)
    rendered = _render(compiled, context, "with")
    if not isinstance(rendered, dict):  # pragma: no cover - the loader only admits mappings
        raise TemplateRenderError(f"step {step.index + 1}: `with` is not a mapping")
    for name in step.file_params & rendered.keys():
        rendered[name] = _resolve_file(step, name, rendered[name])
    return rendered


def _render(value: Any, context: Mapping[str, Any], where: str) -> Any:
    if isinstance(value, Template | Expression):
        try:
            if isinstance(value, Template):
                return _bounded_render(value, context)
            found = value.render(context)  # its operations are bounded by the sandbox
            if isinstance(found, str) and len(found) > MAX_RENDERED_CHARS:
                raise _too_big("the rendered value")
            return found
        except Exception as exc:  # any failure of a template is this run's failure
            raise TemplateRenderError(f"{where}: {exc}") from exc
    if isinstance(value, Mapping):
        return {key: _render(item, context, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [_render(item, context, f"{where}[{i}]") for i, item in enumerate(value)]
    return value


def _bounded_render(template: Template, context: Mapping[str, Any]) -> str:
    """Render, stopping as soon as the output is over MAX_RENDERED_CHARS (a loop of pieces)."""
    pieces, size = [], 0
    for piece in template.generate(context):
        size += len(piece)
        if size > MAX_RENDERED_CHARS:
            raise _too_big("the rendered value")
        pieces.append(piece)
    return "".join(pieces)


def _resolve_file(step: Step, name: str, value: Any) -> str:
    # A templated file name may hold Jira data; it must not climb out of the rules folder.
    if not isinstance(value, str) or not value:
        raise TemplateRenderError(f"with.{name}: a file path must be a non-empty string")
    base = os.path.normpath(os.path.abspath(step.base_dir))
    path = os.path.normpath(os.path.join(base, value))
    if os.path.commonpath([base, path]) != base:
        raise TemplateRenderError(f"with.{name}: {value!r} is outside the rules folder")
    return path
