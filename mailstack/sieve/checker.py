"""Tree -> checked script: every command, test and tag known, its extension required,
its arguments of the right kind.  Pure.  Errors carry line and column like parse errors.

After checking, every Command/Test node has two more attributes the interpreter reads:
  node.tagv  {tag name: value or True}   (value: str, list[str] or int)
  node.posv  [positional values]         (str, list[str] or int)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .match import match_spec
from .parser import Command, Number, SieveSyntaxError, StringList, Tag, Test, parse

SUPPORTED_EXTENSIONS = (
    "fileinto", "reject", "ereject", "envelope", "encoded-character", "vacation", "vacation-seconds",
    "subaddress", "comparator-i;ascii-numeric", "relational", "imap4flags", "copy", "include",
    "body", "variables", "date", "index", "mailbox", "spamtest", "spamtestplus", "virustest",
    "environment", "editheader", "duplicate", "mime",
)
BUILTIN = {"comparator-i;octet", "comparator-i;ascii-casemap"}
COMPARATORS = {"i;octet", "i;ascii-casemap", "i;ascii-numeric"}
RELATIONS = {"gt", "ge", "lt", "le", "eq", "ne"}
DATE_PARTS = {"year", "month", "day", "date", "julian", "hour", "minute", "second", "time", "iso8601",
              "std11", "zone", "weekday"}


# RFC 5228 5.1: the address test looks only at headers that hold addresses
ADDRESS_HEADERS = {"from", "to", "cc", "bcc", "sender", "resent-from", "resent-to", "resent-cc", "resent-bcc",
                    "resent-sender", "reply-to", "return-path", "delivered-to", "x-original-to",
                    "envelope-to", "errors-to", "original-recipient", "disposition-notification-to",
                    "mail-followup-to", "mail-reply-to", "x-envelope-to", "x-envelope-from",
                    "apparently-to", "for", "original-from"}


@dataclass
class Spec:
    ext: str | None = None
    positional: tuple = ((),)  # accepted patterns: tuples of "s" (string), "l" (list), "n" (number)
    tags: dict = field(default_factory=dict)  # tag -> (extension or None, "s"/"l"/"n" or None)
    tests: str = "none"  # none | one | list
    block: bool = False
    groups: tuple = ()  # sets of tags of which at most one may appear


_MATCH = {"is": (None, None), "contains": (None, None), "matches": (None, None),
          "value": ("relational", "s"), "count": ("relational", "s"), "comparator": (None, "s")}
_ADDR = {"all": (None, None), "localpart": (None, None), "domain": (None, None),
         "user": ("subaddress", None), "detail": ("subaddress", None)}
_INDEX = {"index": ("index", "n"), "last": ("index", None)}
_MIME = {"mime": ("mime", None), "anychild": ("mime", None)}
_MIMEOPT = {"type": ("mime", None), "subtype": ("mime", None), "contenttype": ("mime", None),
            "param": ("mime", "l")}
_MG = frozenset({"is", "contains", "matches", "value", "count"})
_AG = frozenset({"all", "localpart", "domain", "user", "detail"})

COMMANDS: dict[str, Spec] = {
    "require": Spec(positional=(("l",),)),
    "if": Spec(tests="one", block=True), "elsif": Spec(tests="one", block=True), "else": Spec(block=True),
    "stop": Spec(), "discard": Spec(),
    "keep": Spec(tags={"flags": ("imap4flags", "l")}),
    "fileinto": Spec("fileinto", (("s",),), {"copy": ("copy", None), "flags": ("imap4flags", "l"),
                                             "create": ("mailbox", None)}),
    "redirect": Spec(positional=(("s",),), tags={"copy": ("copy", None)}),
    "reject": Spec("reject", (("s",),)), "ereject": Spec("ereject", (("s",),)),
    "setflag": Spec("imap4flags", (("l",), ("s", "l"))),
    "addflag": Spec("imap4flags", (("l",), ("s", "l"))),
    "removeflag": Spec("imap4flags", (("l",), ("s", "l"))),
    "set": Spec("variables", (("s", "s"),), {m: (None, None) for m in
                ("lower", "upper", "lowerfirst", "upperfirst", "quotewildcard", "length")},
                groups=(frozenset({"lower", "upper"}), frozenset({"lowerfirst", "upperfirst"}))),
    "vacation": Spec("vacation", (("s",),), {"days": (None, "n"), "seconds": ("vacation-seconds", "n"),
                                             "subject": (None, "s"), "from": (None, "s"),
                                             "addresses": (None, "l"), "mime": (None, None),
                                             "handle": (None, "s")},
                     groups=(frozenset({"days", "seconds"}),)),
    "include": Spec("include", (("s",),), {"personal": (None, None), "global": (None, None),
                                           "once": (None, None), "optional": (None, None)},
                    groups=(frozenset({"personal", "global"}),)),
    "return": Spec("include"),
    "global": Spec("include", (("l",),)),
    "addheader": Spec("editheader", (("s", "s"),), {"last": (None, None)}),
    "deleteheader": Spec("editheader", (("s",), ("s", "l")), {**_MATCH, "index": (None, "n"),
                                                              "last": (None, None)}, groups=(_MG,)),
}

TESTS: dict[str, Spec] = {
    "address": Spec(None, (("l", "l"),), {**_MATCH, **_ADDR, **_INDEX, **_MIME}, groups=(_MG, _AG)),
    "header": Spec(None, (("l", "l"),), {**_MATCH, **_INDEX, **_MIME, **_MIMEOPT},
                   groups=(_MG, frozenset(_MIMEOPT))),
    "envelope": Spec("envelope", (("l", "l"),), {**_MATCH, **_ADDR}, groups=(_MG, _AG)),
    "exists": Spec(None, (("l",),), dict(_MIME)),
    "size": Spec(None, (("n",),), {"over": (None, None), "under": (None, None)},
                 groups=(frozenset({"over", "under"}),)),
    "allof": Spec(tests="list"), "anyof": Spec(tests="list"), "not": Spec(tests="one"),
    "true": Spec(), "false": Spec(),
    "mailboxexists": Spec("mailbox", (("l",),)),
    "hasflag": Spec("imap4flags", (("l",), ("l", "l")), dict(_MATCH), groups=(_MG,)),
    "string": Spec("variables", (("l", "l"),), dict(_MATCH), groups=(_MG,)),
    "body": Spec("body", (("l",),), {**_MATCH, "raw": (None, None), "content": (None, "l"),
                                     "text": (None, None)},
                 groups=(_MG, frozenset({"raw", "content", "text"}))),
    "date": Spec("date", (("s", "s", "l"),), {**_MATCH, **_INDEX, "zone": (None, "s"),
                                              "originalzone": (None, None)},
                 groups=(_MG, frozenset({"zone", "originalzone"}))),
    "currentdate": Spec("date", (("s", "l"),), {**_MATCH, "zone": (None, "s")}, groups=(_MG,)),
    "spamtest": Spec("spamtest", (("s",),), {**_MATCH, "percent": ("spamtestplus", None)}, groups=(_MG,)),
    "virustest": Spec("virustest", (("s",),), dict(_MATCH), groups=(_MG,)),
    "environment": Spec("environment", (("s", "l"),), dict(_MATCH), groups=(_MG,)),
    "duplicate": Spec("duplicate", ((),), {"handle": (None, "s"), "header": (None, "s"),
                                           "uniqueid": (None, "s"), "seconds": (None, "n"),
                                           "last": (None, None)},
                      groups=(frozenset({"header", "uniqueid"}),)),
}

# Tests whose extension may be any one of several (spamtestplus implies spamtest).
_ALSO = {"spamtest": ("spamtestplus",)}


@dataclass
class Script:
    commands: list[Command]
    extensions: set[str]
    uses: set[str]  # command and test names used (the interpreter prefetches what they need)


def _valid_mailbox(text: str) -> bool:
    """An RFC 5322 mailbox ("Name <a@b>" or "a@b") on one line."""
    import email.utils
    if "\r" in text or "\n" in text:
        return False
    _, addr = email.utils.parseaddr(text)
    local, at, domain = addr.rpartition("@")
    return bool(at and local and domain and " " not in addr)


def _err(node, msg: str) -> SieveSyntaxError:
    return SieveSyntaxError(msg, node.line, node.column)


_ENCODED = re.compile(r"\$\{(hex|unicode):([^}]*)\}", re.IGNORECASE)


def decode_encoded_characters(s: str) -> str:
    """RFC 5228 2.4.2.4: ${hex: 41 42} and ${unicode: 263A}; a malformed one stays as written."""
    if "${" not in s:
        return s

    def repl(m: re.Match) -> str:
        kind, body = m.group(1).lower(), m.group(2).split()
        if not body or not all(re.fullmatch(r"[0-9A-Fa-f]+", b) for b in body):
            return m.group(0)
        if kind == "hex":
            try:
                return bytes(int(b, 16) for b in body if int(b, 16) < 256).decode("utf-8")
            except (UnicodeDecodeError, ValueError):
                return m.group(0)
        try:
            cps = [int(b, 16) for b in body]
            if any(cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF for cp in cps):
                raise ValueError
            return "".join(map(chr, cps))
        except ValueError:
            raise ValueError(f"invalid unicode character in {m.group(0)!r}")
    return _ENCODED.sub(repl, s)


class _Checker:
    def __init__(self) -> None:
        self.exts: set[str] = set()
        self.uses: set[str] = set()

    def require_ok(self, node, ext: str | None, what: str) -> None:
        if ext is None:
            return
        if ext in self.exts or any(a in self.exts for a in _ALSO.get(ext, ())):
            return
        raise _err(node, f"{what} needs require \"{ext}\"")

    def commands(self, cmds: list[Command], top: bool) -> None:
        prev = None
        seen_other = False
        for cmd in cmds:
            if cmd.name == "require":
                if not top or seen_other:
                    raise _err(cmd, "require must come before any other command")
            else:
                seen_other = True
            if cmd.name in ("elsif", "else") and (prev is None or prev.name not in ("if", "elsif")):
                raise _err(cmd, f"'{cmd.name}' without a preceding 'if'")
            self.command(cmd)
            prev = cmd

    def command(self, cmd: Command) -> None:
        spec = COMMANDS.get(cmd.name)
        if spec is None:
            raise _err(cmd, f"unknown command '{cmd.name}'")
        self.require_ok(cmd, spec.ext, f"command '{cmd.name}'")
        self.uses.add(cmd.name)
        self.arguments(cmd, spec, "command")
        if cmd.name == "require":
            for ext in cmd.posv[0]:
                e = ext.lower()
                if e not in SUPPORTED_EXTENSIONS and e not in BUILTIN:
                    raise _err(cmd, f"unsupported extension \"{ext}\"")
                self.exts.add(e)
            if "encoded-character" in self.exts:
                self.decode = True
        if spec.tests == "one":
            if len(cmd.tests) != 1:
                raise _err(cmd, f"'{cmd.name}' needs one test")
        elif cmd.tests:
            raise _err(cmd, f"'{cmd.name}' takes no test")
        for t in cmd.tests:
            self.test(t)
        if spec.block:
            if cmd.block is None:
                raise _err(cmd, f"'{cmd.name}' needs a block")
            self.commands(cmd.block, top=False)
        elif cmd.block is not None:
            raise _err(cmd, f"'{cmd.name}' takes no block")
        if cmd.name == "vacation" and "days" in cmd.tagv and cmd.tagv["days"] < 0:
            raise _err(cmd, ":days must not be negative")
        if cmd.name == "vacation" and "from" in cmd.tagv and "${" not in cmd.tagv["from"]:
            if not _valid_mailbox(cmd.tagv["from"]):
                raise _err(cmd, f"vacation :from \"{cmd.tagv['from']}\" is not a valid address")
        if cmd.name == "redirect" and "${" not in cmd.posv[0] and not _valid_mailbox(cmd.posv[0]):
            raise _err(cmd, f"redirect to \"{cmd.posv[0]}\": not a valid address")

    def test(self, test: Test) -> None:
        spec = TESTS.get(test.name)
        if spec is None:
            raise _err(test, f"unknown test '{test.name}'")
        self.require_ok(test, spec.ext, f"test '{test.name}'")
        self.uses.add(test.name)
        self.arguments(test, spec, "test")
        if spec.tests == "one" and len(test.tests) != 1:
            raise _err(test, f"'{test.name}' needs one test")
        if spec.tests == "list" and not test.tests:
            raise _err(test, f"'{test.name}' needs a list of tests")
        if spec.tests == "none" and test.tests:
            raise _err(test, f"'{test.name}' takes no test")
        for t in test.tests:
            self.test(t)
        if test.name == "size" and not ({"over", "under"} & test.tagv.keys()):
            raise _err(test, "'size' needs :over or :under")
        if test.name == "address" and not test.tagv.get("mime"):
            for name in test.posv[0]:
                if "${" not in name and name.lower() not in ADDRESS_HEADERS:
                    raise _err(test, f"header \"{name}\" holds no addresses: not allowed in the address test")
        mime_tags = {"anychild", *_MIMEOPT} & test.tagv.keys()
        if mime_tags and not test.tagv.get("mime"):
            raise _err(test, f"':{sorted(mime_tags)[0]}' needs ':mime'")
        if test.name in ("date", "currentdate"):
            part = test.posv[-2]
            if "${" not in part and part.lower() not in DATE_PARTS:
                raise _err(test, f"unknown date part \"{part}\"")

    decode = False

    def string(self, s: str, node=None) -> str:
        if self.decode:
            try:
                return decode_encoded_characters(s)
            except ValueError as e:
                raise SieveSyntaxError(str(e), getattr(node, "line", 1), getattr(node, "column", 1))
        return s

    def arguments(self, node, spec: Spec, kind: str) -> None:
        tagv: dict = {}
        pos: list = []
        args = node.args
        i = 0
        while i < len(args):
            a = args[i]
            if isinstance(a, Tag):
                if pos:
                    raise _err(a, f"tag ':{a.name}' after the positional arguments of '{node.name}'")
                t = spec.tags.get(a.name)
                if t is None:
                    raise _err(a, f"unknown tag ':{a.name}' for {kind} '{node.name}'")
                ext, argkind = t
                self.require_ok(a, ext, f"tag ':{a.name}'")
                if a.name in tagv:
                    raise _err(a, f"tag ':{a.name}' given twice")
                for g in spec.groups:
                    if a.name in g and g & tagv.keys():
                        raise _err(a, f"tag ':{a.name}' conflicts with ':{next(iter(g & tagv.keys()))}'")
                if argkind is None:
                    tagv[a.name] = True
                else:
                    i += 1
                    if i >= len(args):
                        raise _err(a, f"tag ':{a.name}' needs an argument")
                    tagv[a.name] = self.value(args[i], argkind, f"argument of ':{a.name}'")
            else:
                pos.append(a)
            i += 1
        shapes = spec.positional
        for shape in shapes:
            if len(shape) == len(pos) and all(self.fits(p, k) for p, k in zip(pos, shape)):
                node.posv = [self.value(p, k, "argument") for p, k in zip(pos, shape)]
                break
        else:
            want = " or ".join(_shape_text(s) for s in shapes)
            raise _err(node, f"'{node.name}' takes {want}")
        if "comparator" in tagv:
            comp = tagv["comparator"].lower()
            if comp not in COMPARATORS:
                raise _err(node, f"unknown comparator \"{tagv['comparator']}\"")
            if f"comparator-{comp}" not in self.exts and f"comparator-{comp}" not in BUILTIN:
                raise _err(node, f"comparator \"{comp}\" needs require \"comparator-{comp}\"")
            tagv["comparator"] = comp
            if comp == "i;ascii-numeric" and ({"contains", "matches"} & tagv.keys()):
                raise _err(node, "comparator \"i;ascii-numeric\" cannot do substring matches (:contains, :matches)")
        for rel in ("value", "count"):
            if rel in tagv:
                if tagv[rel].lower() not in RELATIONS:
                    raise _err(node, f"unknown relation \"{tagv[rel]}\"")
                tagv[rel] = tagv[rel].lower()
        if "index" in tagv and tagv["index"] < 1:
            raise _err(node, ":index must be 1 or more")
        if "is" in spec.tags:  # a test that matches: its match type and comparator, resolved once
            tagv["_spec"] = match_spec(tagv)
        node.tagv = tagv

    @staticmethod
    def fits(arg, kind: str) -> bool:
        if kind == "n":
            return isinstance(arg, Number)
        if kind == "s":
            return isinstance(arg, StringList) and len(arg.values) == 1
        return isinstance(arg, StringList)

    def value(self, arg, kind: str, what: str):
        if not self.fits(arg, kind):
            raise _err(arg, f"{what} must be {_KIND_TEXT[kind]}")
        if kind == "n":
            return arg.value
        if kind == "s":
            return self.string(arg.values[0], arg)
        return [self.string(v, arg) for v in arg.values]


_KIND_TEXT = {"s": "a string", "l": "a string list", "n": "a number"}


def _shape_text(shape: tuple) -> str:
    if not shape:
        return "no arguments"
    return ", ".join(_KIND_TEXT[k] for k in shape)


def check(commands: list[Command]) -> Script:
    c = _Checker()
    c.commands(commands, top=True)
    return Script(commands, c.exts, c.uses)


def compile_script(text: str, max_size: int = 1 << 20) -> Script:
    """Script text -> checked Script.  Raises SieveSyntaxError (line, column, message)."""
    if len(text) > max_size:
        raise SieveSyntaxError(f"script too large ({len(text)} > {max_size} characters)", 1, 1)
    return check(parse(text))
