"""The line lexer both IR text formats share: one line's tokens with a cursor.

graph_text.py and tile_text.py each give it their token pattern (a regex of
named groups) and how an error names its place; what a token means stays in
each format's parser.
"""
from __future__ import annotations

import re
from typing import Callable

from tilecomp.errors import IRError


class LineTokens:
    """Tokens (group name, text) of one line; `fail` raises IRError at `where(msg)`."""

    def __init__(self, pattern: re.Pattern, text: str, where: Callable[[str], str]):
        self.where = where
        self.tokens: list[tuple[str, str]] = []
        pos, text = 0, text.rstrip()
        while pos < len(text):
            m = pattern.match(text, pos)
            if m is None or m.end() == pos:
                self.fail(f"unexpected character {text[pos:].lstrip()[:1]!r} at column {pos + 1}")
            self.tokens.append((m.lastgroup, m.group(m.lastgroup)))
            pos = m.end()
        self.i = 0

    def fail(self, msg: str):
        raise IRError(self.where(msg))

    def peek(self) -> str | None:
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def take(self, kind: str | None = None, text: str | None = None) -> str:
        """The next token's text; it must be of group `kind` / equal `text` when given."""
        if self.i >= len(self.tokens):
            self.fail(f"line ends early: expected {text or kind or 'more'}")
        k, t = self.tokens[self.i]
        if (kind and k != kind) or (text and t != text):
            self.fail(f"expected {text or kind}, found {t!r}")
        self.i += 1
        return t

    def accept(self, text: str) -> bool:
        if self.peek() == text:
            self.i += 1
            return True
        return False

    def done(self):
        if self.i != len(self.tokens):
            self.fail(f"unexpected {self.tokens[self.i][1]!r} at end of line")
