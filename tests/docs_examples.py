"""Python code blocks of the README and the docs, extracted to be run by ``test_docs_examples.py``.

A block is a fenced ```` ```python ```` block; the HTML comment ``<!-- no-run: reason -->`` on the
line right before its fence leaves it out (a GPU-only recipe, say), with the reason on record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^\n`]*)$")
NO_RUN = re.compile(r"<!--\s*no-run:\s*(?P<reason>.+?)\s*-->")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language and code, and why it is skipped (if it is)."""

    path: Path
    line: int
    language: str
    code: str
    skip_reason: str | None


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, in order (the code dedented to its fence).

    Args:
        path: the Markdown file.
    """
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, info = len(match["indent"]), match["info"].strip()
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path}:{start + 1}: the code fence never closes")
        previous = lines[start - 1] if start > 0 else ""
        skip = NO_RUN.search(previous)
        language = info.split()[0] if info else ""
        out.append(Block(path, start + 1, language, "\n".join(body) + "\n", skip["reason"] if skip else None))
        i += 1
    return out


def pages() -> list[Path]:
    """The README and every page of the docs."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(path: Path) -> list[Block]:
    """The page's Python blocks (``python`` or ``py`` fences)."""
    return [b for b in blocks(path) if b.language in ("python", "py")]
