"""Sieve (RFC 5228 section 8) text -> tree.  Pure: no I/O, no knowledge of commands.

    parse(text) -> list[Command]          raises SieveSyntaxError(message, line, column)

Which commands and tags exist, and what a script may use after `require`, is the
checker's job (sieve/checker.py); this module knows only the grammar:

    commands   = *command
    command    = identifier arguments (";" / block)
    block      = "{" commands "}"
    arguments  = *argument [test / test-list]
    argument   = string-list / number / tag
    test       = identifier arguments
    test-list  = "(" test *("," test) ")"

Strings are "quoted" (with \\ escapes) or multi-line (`text:` ... a line with one ".",
dot-stuffed).  Numbers may carry K, M or G.  Comments are `#` to end of line and
`/* ... */`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_NESTING = 64  # blocks and tests inside each other; deeper is refused, not a RecursionError
MAX_LIST = 1024  # strings in one string list
MAX_NUMBER = 2**63 - 1


class SieveSyntaxError(Exception):
    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"line {line}, column {column}: {message}")
        self.message, self.line, self.column = message, line, column


@dataclass
class Tag:
    name: str  # lower case, without the colon
    line: int = 0
    column: int = 0


@dataclass
class Number:
    value: int
    line: int = 0
    column: int = 0


@dataclass
class StringList:
    values: list[str]
    bracketed: bool  # written as ["a", "b"] (a one-string list may be either)
    line: int = 0
    column: int = 0


@dataclass
class Test:
    name: str  # lower case
    args: list = field(default_factory=list)  # Tag | Number | StringList
    tests: list["Test"] = field(default_factory=list)
    line: int = 0
    column: int = 0


@dataclass
class Command:
    name: str  # lower case
    args: list = field(default_factory=list)
    tests: list[Test] = field(default_factory=list)  # one test, or a test list (allof/anyof live in Test)
    block: list["Command"] | None = None
    line: int = 0
    column: int = 0


# Token kinds
_IDENT, _TAG, _NUM, _STR, _SPECIAL, _EOF = "identifier", "tag", "number", "string", "special", "end of script"


@dataclass
class _Token:
    kind: str
    value: object
    line: int
    column: int


def _is_ident_start(c: str) -> bool:
    return c == "_" or ("a" <= c <= "z") or ("A" <= c <= "Z")


def _is_ident_char(c: str) -> bool:
    return _is_ident_start(c) or ("0" <= c <= "9")


def tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n, line, line_start = 0, len(text), 1, 0

    def err(msg: str, at: int | None = None) -> SieveSyntaxError:
        pos = i if at is None else at
        return SieveSyntaxError(msg, line, pos - line_start + 1)

    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
            line_start = i
        elif c in " \t\r":
            i += 1
        elif c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif c == "/" and text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                raise err("unterminated comment")
            chunk = text[i:j + 2]
            nl = chunk.count("\n")
            if nl:
                line += nl
                line_start = i + chunk.rfind("\n") + 1
            i = j + 2
        elif c == '"':
            sline, scol = line, i - line_start + 1
            i += 1
            out = []
            while True:
                if i >= n:
                    raise SieveSyntaxError("unterminated string", sline, scol)
                ch = text[i]
                if ch == "\\":
                    if i + 1 >= n:
                        raise SieveSyntaxError("unterminated string", sline, scol)
                    out.append(text[i + 1])  # RFC 5228 2.4.2: \x is x for any x
                    if text[i + 1] == "\n":
                        line += 1
                        line_start = i + 2
                    i += 2
                    continue
                if ch == '"':
                    i += 1
                    break
                if ch == "\n":
                    line += 1
                    line_start = i + 1
                out.append(ch)
                i += 1
            # RFC 5228 2.4.2: line breaks inside strings are CRLF
            s = "".join(out).replace("\r\n", "\n").replace("\n", "\r\n")
            tokens.append(_Token(_STR, s, sline, scol))
        elif c in "0123456789":
            sline, scol = line, i - line_start + 1
            j = i
            while j < n and text[j].isdigit() and text[j].isascii():
                j += 1
            value = int(text[i:j])
            if j < n and text[j] in "KkMmGg":
                value *= {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[text[j].lower()]
                j += 1
            if j < n and _is_ident_char(text[j]):
                raise err("bad number", j)
            if value > MAX_NUMBER:
                raise SieveSyntaxError("number too large", sline, scol)
            tokens.append(_Token(_NUM, value, sline, scol))
            i = j
        elif c == ":":
            sline, scol = line, i - line_start + 1
            j = i + 1
            if j >= n or not _is_ident_start(text[j]):
                raise err("a tag is ':' followed by a name")
            while j < n and _is_ident_char(text[j]):
                j += 1
            tokens.append(_Token(_TAG, text[i + 1:j].lower(), sline, scol))
            i = j
        elif _is_ident_start(c):
            sline, scol = line, i - line_start + 1
            j = i
            while j < n and _is_ident_char(text[j]):
                j += 1
            word = text[i:j]
            if word.lower() == "text" and j < n and text[j] == ":":
                i = j + 1
                # rest of the line: blanks and an optional hash comment, then CRLF
                k = text.find("\n", i)
                if k < 0:
                    raise SieveSyntaxError("multi-line string never ends", sline, scol)
                rest = text[i:k].rstrip("\r").strip(" \t")
                if rest and not rest.startswith("#"):
                    raise err("nothing but a comment may follow 'text:' on its line")
                i = k + 1
                line += 1
                line_start = i
                lines = []
                while True:
                    if i >= n:
                        raise SieveSyntaxError("multi-line string never ends (no line with a single '.')",
                                               sline, scol)
                    k = text.find("\n", i)
                    raw = text[i:] if k < 0 else text[i:k]
                    body = raw[:-1] if raw.endswith("\r") else raw
                    i = n if k < 0 else k + 1
                    line += 1
                    line_start = i
                    if body == ".":
                        break
                    if k < 0:
                        raise SieveSyntaxError("multi-line string never ends (no line with a single '.')",
                                               sline, scol)
                    lines.append(body[1:] if body.startswith("..") else body)
                tokens.append(_Token(_STR, "".join(l + "\r\n" for l in lines), sline, scol))
            else:
                tokens.append(_Token(_IDENT, word.lower(), sline, scol))
                i = j
        elif c in ";{}()[],":
            tokens.append(_Token(_SPECIAL, c, line, i - line_start + 1))
            i += 1
        else:
            raise err(f"unexpected character {c!r}")
    tokens.append(_Token(_EOF, None, line, i - line_start + 1))
    return tokens


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.toks = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.toks[self.pos]

    def take(self) -> _Token:
        t = self.toks[self.pos]
        if t.kind != _EOF:
            self.pos += 1
        return t

    def is_special(self, ch: str) -> bool:
        t = self.peek()
        return t.kind == _SPECIAL and t.value == ch

    def expect(self, ch: str, what: str) -> _Token:
        t = self.peek()
        if t.kind == _SPECIAL and t.value == ch:
            return self.take()
        raise SieveSyntaxError(f"expected {what}, found {_describe(t)}", t.line, t.column)

    def enter(self, t: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise SieveSyntaxError("nested too deeply", t.line, t.column)

    def commands(self, until_brace: bool) -> list[Command]:
        out: list[Command] = []
        while True:
            t = self.peek()
            if t.kind == _EOF:
                if until_brace:
                    raise SieveSyntaxError("missing '}' at end of script", t.line, t.column)
                return out
            if until_brace and t.kind == _SPECIAL and t.value == "}":
                return out
            out.append(self.command())

    def command(self) -> Command:
        t = self.take()
        if t.kind != _IDENT:
            raise SieveSyntaxError(f"expected a command, found {_describe(t)}", t.line, t.column)
        cmd = Command(t.value, line=t.line, column=t.column)  # type: ignore[arg-type]
        cmd.args, cmd.tests = self.arguments()
        nt = self.peek()
        if nt.kind == _SPECIAL and nt.value == ";":
            self.take()
        elif nt.kind == _SPECIAL and nt.value == "{":
            self.take()
            self.enter(nt)
            cmd.block = self.commands(until_brace=True)
            self.depth -= 1
            self.expect("}", "'}'")
        else:
            raise SieveSyntaxError(f"expected ';' or a block after '{cmd.name}', found {_describe(nt)}",
                                   nt.line, nt.column)
        return cmd

    def arguments(self) -> tuple[list, list[Test]]:
        args: list = []
        while True:
            t = self.peek()
            if t.kind == _TAG:
                self.take()
                args.append(Tag(t.value, t.line, t.column))  # type: ignore[arg-type]
            elif t.kind == _NUM:
                self.take()
                args.append(Number(t.value, t.line, t.column))  # type: ignore[arg-type]
            elif t.kind == _STR:
                self.take()
                args.append(StringList([t.value], False, t.line, t.column))  # type: ignore[list-item]
            elif t.kind == _SPECIAL and t.value == "[":
                args.append(self.string_list())
            else:
                break
        tests: list[Test] = []
        t = self.peek()
        if t.kind == _IDENT:
            tests = [self.test()]
        elif t.kind == _SPECIAL and t.value == "(":
            tests = self.test_list()
        return args, tests

    def string_list(self) -> StringList:
        open_t = self.take()
        values: list[str] = []
        while True:
            t = self.take()
            if t.kind != _STR:
                raise SieveSyntaxError(f"expected a string in the list, found {_describe(t)}", t.line, t.column)
            values.append(t.value)  # type: ignore[arg-type]
            if len(values) > MAX_LIST:
                raise SieveSyntaxError("string list too long", t.line, t.column)
            t = self.take()
            if t.kind == _SPECIAL and t.value == "]":
                return StringList(values, True, open_t.line, open_t.column)
            if not (t.kind == _SPECIAL and t.value == ","):
                raise SieveSyntaxError(f"expected ',' or ']' in string list, found {_describe(t)}",
                                       t.line, t.column)

    def test(self) -> Test:
        t = self.take()
        if t.kind != _IDENT:
            raise SieveSyntaxError(f"expected a test, found {_describe(t)}", t.line, t.column)
        self.enter(t)
        test = Test(t.value, line=t.line, column=t.column)  # type: ignore[arg-type]
        test.args, test.tests = self.arguments()
        self.depth -= 1
        return test

    def test_list(self) -> list[Test]:
        open_t = self.take()
        self.enter(open_t)
        tests = [self.test()]
        while True:
            t = self.take()
            if t.kind == _SPECIAL and t.value == ")":
                self.depth -= 1
                return tests
            if not (t.kind == _SPECIAL and t.value == ","):
                raise SieveSyntaxError(f"expected ',' or ')' in test list, found {_describe(t)}", t.line, t.column)
            tests.append(self.test())


def _describe(t: _Token) -> str:
    if t.kind == _EOF:
        return "end of script"
    if t.kind == _SPECIAL:
        return f"'{t.value}'"
    if t.kind == _TAG:
        return f"tag ':{t.value}'"
    if t.kind == _STR:
        return "a string"
    return f"{t.kind} '{t.value}'"


def parse(text: str) -> list[Command]:
    """Script text -> list of commands.  Raises SieveSyntaxError with line and column."""
    if "\x00" in text:
        i = text.index("\x00")
        line = text.count("\n", 0, i) + 1
        raise SieveSyntaxError("NUL character in script", line, i - (text.rfind("\n", 0, i) + 1) + 1)
    return _Parser(tokenize(text)).commands(until_brace=False)
