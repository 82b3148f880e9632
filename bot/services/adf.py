"""Plain text or light Markdown to Atlassian Document Format (Jira Cloud's comment body).

Pure. Understood: paragraphs (blank line), line breaks, `# headings`, `- `/`* ` and `1. `
lists, fenced code blocks, `**bold**`, `*italic*`, `` `code` `` and `[text](http...)` links.
Everything else is text as written: a value from Jira is never interpreted beyond that.
"""

from __future__ import annotations

import re
from typing import Any

Node = dict[str, Any]

_INLINE = re.compile(
    r"\*\*(?P<strong>[^*\n]+)\*\*"
    r"|`(?P<code>[^`\n]+)`"
    r"|\[(?P<label>[^\]\n]+)\]\((?P<href>https?://[^)\s]+)\)"
    r"|(?<![\w*])\*(?P<em>[^*\s][^*\n]*)\*(?![\w*])"
)
_BULLET = re.compile(r"^\s*[-*]\s+(.*)$")
_ORDERED = re.compile(r"^\s*\d+[.)]\s+(.*)$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")


def _text(value: str, marks: list[Node] | None = None) -> Node:
    node: Node = {"type": "text", "text": value}
    if marks:
        node["marks"] = marks
    return node


def inline(text: str) -> list[Node]:
    """Turn one line of text into ADF inline nodes (never an empty text node)."""
    nodes: list[Node] = []
    pos = 0
    for match in _INLINE.finditer(text):
        if match.start() > pos:
            nodes.append(_text(text[pos : match.start()]))
        if match["strong"] is not None:
            nodes.append(_text(match["strong"], [{"type": "strong"}]))
        elif match["code"] is not None:
            nodes.append(_text(match["code"], [{"type": "code"}]))
        elif match["label"] is not None:
            nodes.append(
                _text(match["label"], [{"type": "link", "attrs": {"href": match["href"]}}])
            )
        else:
            nodes.append(_text(match["em"], [{"type": "em"}]))
        pos = match.end()
    if pos < len(text):
        nodes.append(_text(text[pos:]))
    return nodes


def _paragraph(lines: list[str]) -> Node:
    content: list[Node] = []
    for i, line in enumerate(lines):
        if i:
            content.append({"type": "hardBreak"})
        content.extend(inline(line))
    return {"type": "paragraph", "content": content} if content else {"type": "paragraph"}


def _list(kind: str, items: list[str]) -> Node:
    return {
        "type": kind,
        "content": [{"type": "listItem", "content": [_paragraph([item])]} for item in items],
    }


def to_adf(text: str) -> Node:
    """Return the ADF document of a plain-text or light-Markdown body."""
    blocks: list[Node] = []
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    paragraph: list[str] = []
    items: list[str] = []
    kind = ""

    def flush() -> None:
        nonlocal kind
        if paragraph:
            blocks.append(_paragraph(paragraph))
            paragraph.clear()
        if items:
            blocks.append(_list(kind, items))
            items.clear()
        kind = ""

    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.strip().startswith("```"):
            flush()
            language = line.strip()[3:].strip()
            code: list[str] = []
            while i < len(lines) and not lines[i].strip().startswith("```"):
                code.append(lines[i])
                i += 1
            i += 1  # the closing fence (or the end)
            block: Node = {"type": "codeBlock"}
            if language:
                block["attrs"] = {"language": language}
            if any(code):
                block["content"] = [_text("\n".join(code))]
            blocks.append(block)
            continue
        if not line.strip():
            flush()
            continue
        heading = _HEADING.match(line)
        bullet = _BULLET.match(line)
        ordered = _ORDERED.match(line)
        if heading and heading[2].strip():
            flush()
            blocks.append(
                {
                    "type": "heading",
                    "attrs": {"level": len(heading[1])},
                    "content": inline(heading[2].strip()),
                }
            )
        elif bullet or ordered:
            new_kind = "bulletList" if bullet else "orderedList"
            if paragraph or kind != new_kind:
                flush()
            kind = new_kind
            items.append((bullet or ordered)[1])  # type: ignore[index]
        else:
            if items:
                flush()
            paragraph.append(line)
    flush()
    return {"type": "doc", "version": 1, "content": blocks or [{"type": "paragraph"}]}


def plain_text(doc: Any) -> str:
    """Return the text of an ADF document (for results and error messages)."""
    if isinstance(doc, dict):
        if doc.get("type") == "text":
            return str(doc.get("text", ""))
        if doc.get("type") == "hardBreak":
            return "\n"
        parts = [plain_text(child) for child in doc.get("content") or ()]
        joined = "".join(parts)
        block = doc.get("type") in ("paragraph", "heading", "codeBlock", "listItem")
        return joined + ("\n" if block else "")
    return ""
