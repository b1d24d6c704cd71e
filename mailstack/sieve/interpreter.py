"""Run a checked Sieve script against one message: actions out, nothing done.

Pure apart from the `Host` callbacks (include loading, mailbox existence, duplicate
memory), so `mailstack sieve test`, the DATA-time reject check and delivery all run
the same code; the delivery side (sieve/deliver.py) carries the actions out.
Work is bounded: steps (commands + tests evaluated), actions, redirects, include depth.
"""
from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import re
from dataclasses import dataclass, field

from . import match
from .checker import ADDRESS_HEADERS as _ADDRESS_HEADERS, Script
from .extensions import date as datex
from .extensions.spamtest import spamtest_value, virustest_value
from .message import RawAddress, SieveMessage, parse_addresses

PROTECTED_HEADERS = {"received", "auto-submitted"}  # editheader may not touch these (RFC 5293 §6)
MAX_VARIABLE = 4096  # characters kept in one variable
SUBADDRESS_SEPARATOR = "+"
_ASCII_LOWER = {c: c + 32 for c in range(65, 91)}
_ASCII_UPPER = {c: c - 32 for c in range(97, 123)}


class SieveRuntimeError(Exception):
    pass


@dataclass
class Limits:
    max_steps: int = 10_000
    max_actions: int = 32
    max_redirects: int = 4
    max_include_depth: int = 5


@dataclass
class Action:
    kind: str  # keep | fileinto | redirect | discard | reject | ereject | vacation
    arg: str = ""  # mailbox, address or reason
    flags: tuple = ()
    copy: bool = False
    create: bool = False
    params: dict = field(default_factory=dict)  # vacation: days/seconds/subject/from/addresses/mime/handle

    def describe(self) -> str:
        """One line, as `mailstack sieve test` prints it."""
        if self.kind in ("keep", "fileinto"):
            s = "keep" if self.kind == "keep" else f'fileinto "{self.arg}"'
            if self.create:
                s += " :create"
            if self.copy:
                s += " :copy"
            if self.flags:
                s += " :flags " + " ".join(self.flags)
            return s
        if self.kind == "redirect":
            return f'redirect "{self.arg}"' + (" :copy" if self.copy else "")
        if self.kind in ("reject", "ereject"):
            return f'{self.kind} "{_one_line(self.arg)}"'
        if self.kind == "vacation":
            p = self.params
            return (f'vacation to "{p.get("to", "")}" subject "{_one_line(p.get("subject") or "")}" '
                    f'period {p.get("seconds")}s')
        return self.kind


def _one_line(s: str) -> str:
    return " ".join(s.split())[:200]


@dataclass
class Result:
    actions: list[Action]  # explicit actions plus the implicit keep when it stands
    message: SieveMessage
    duplicate_marks: list[tuple[str, int]] = field(default_factory=list)  # (key, seconds) to remember
    error: str | None = None  # a run-time error: the caller keeps the message

    @property
    def implicit_keep(self) -> bool:
        return any(a.kind == "keep" and a.params.get("implicit") for a in self.actions)


class Host:
    """What a script may ask of the world.  The defaults describe an empty one."""

    def load_include(self, name: str, is_global: bool) -> Script | None:
        return None

    def mailbox_exists(self, name: str) -> bool:
        return name.upper() == "INBOX"

    def duplicate_seen(self, key: str) -> bool:
        return False


@dataclass
class Context:
    message: SieveMessage
    envelope_from: str = ""
    envelope_to: str = ""
    account: str = ""
    meta: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    now: dt.datetime | None = None
    host: Host = field(default_factory=Host)
    limits: Limits = field(default_factory=Limits)
    separator: str = SUBADDRESS_SEPARATOR  # delivery.plus_separator


class _Stop(Exception):
    pass


class _Return(Exception):
    pass


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.]*|[0-9]+)\}")


class _Frame:
    """One script being run (the main one, or an included one) with its variables."""

    def __init__(self, script: Script, shared_globals: dict) -> None:
        self.script = script
        self.vars: dict[str, str] = {}
        self.globals = shared_globals
        self.global_names: set[str] = set()
        self.variables = "variables" in script.extensions

    def get(self, name: str) -> str:
        name = name.lower()
        if name in self.global_names:
            return self.globals.get(name, "")
        return self.vars.get(name, "")

    def set(self, name: str, value: str) -> None:
        name = name.lower()
        value = value[:MAX_VARIABLE]
        if name in self.global_names:
            self.globals[name] = value
        else:
            self.vars[name] = value


class Interpreter:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.msg = ctx.message
        self.actions: list[Action] = []
        self.implicit_keep = True
        self.flags: list[str] = []  # imap4flags internal variable
        self.captures: list[str] = []
        self.steps = 0
        self.max_steps = ctx.limits.max_steps
        self.redirects = 0
        self.globals: dict[str, str] = {}
        self.included_once: set[tuple[bool, str]] = set()
        self.depth = 0
        self.duplicate_marks: list[tuple[str, int]] = []
        self.frame: _Frame | None = None

    # --- entry point ----------------------------------------------------------------------
    def run(self, scripts: list[Script]) -> Result:
        """Run scripts in order (global before, user's, global after), as Pigeonhole does:
        `stop` ends the script it is in; the next script runs only while the message is still
        kept (implicitly or by an explicit keep): a fileinto, redirect or discard ends the
        sequence.  Flags carry over, variables do not (unless declared global)."""
        error = None
        try:
            for script in scripts:
                self.frame = _Frame(script, self.globals)
                first = len(self.actions)
                try:
                    self.block(script.commands)
                except (_Return, _Stop):
                    pass
                if not self.implicit_keep and not any(a.kind == "keep" for a in self.actions[first:]):
                    break  # the message went elsewhere (or was discarded): later scripts do not run
        except SieveRuntimeError as e:
            error = str(e)
        except RecursionError:
            error = "script nested too deeply"
        if error is not None:
            # RFC 5228 2.10.6: on a run-time error, keep the message (as it came: editheader
            # changes are dropped too); no other action.
            return Result([Action("keep", "INBOX", params={"implicit": True})], SieveMessage(self.msg.raw), [],
                          error)
        actions = list(self.actions)
        if self.implicit_keep:
            actions.append(Action("keep", "INBOX", tuple(self.flags), params={"implicit": True}))
        return Result(actions, self.msg, self.duplicate_marks)

    # --- helpers ---------------------------------------------------------------------------
    def step(self) -> None:
        self.steps += 1
        if self.steps > self.ctx.limits.max_steps:
            raise SieveRuntimeError(f"script ran more than {self.ctx.limits.max_steps} steps")

    def s(self, value):
        """Expand ${variables} in a string or each string of a list."""
        if not self.frame.variables:
            return value
        if value.__class__ is str:
            return value if "${" not in value else self._expand(value)
        if value.__class__ is list:
            return [v if "${" not in v else self._expand(v) for v in value]
        return value

    def _expand(self, text: str) -> str:
        if "${" not in text:
            return text

        def repl(m: re.Match) -> str:
            name = m.group(1)
            if name.isdigit():
                i = int(name)
                return self.captures[i] if i < len(self.captures) else ""
            return self.frame.get(name)
        return _VAR.sub(repl, text)

    def add_action(self, action: Action) -> None:
        if len(self.actions) >= self.ctx.limits.max_actions:
            raise SieveRuntimeError(f"more than {self.ctx.limits.max_actions} actions")
        kinds = {a.kind for a in self.actions}
        if action.kind in ("reject", "ereject"):
            if kinds & {"keep", "fileinto", "redirect", "vacation", "reject", "ereject"}:
                raise SieveRuntimeError(f"{action.kind} cannot be combined with other actions")
        elif kinds & {"reject", "ereject"} and action.kind != "discard":
            raise SieveRuntimeError(f"{action.kind} cannot be combined with reject")
        if action.kind == "vacation" and "vacation" in kinds:
            raise SieveRuntimeError("only one vacation action per message")
        for a in self.actions:  # RFC 5228 2.10.3: the same fileinto/keep/redirect twice is done once
            if a.kind == action.kind and a.arg == action.arg and action.kind in ("fileinto", "redirect", "keep"):
                if action.kind != "redirect":
                    a.flags = action.flags  # the last one's flags, as Pigeonhole
                a.copy = a.copy and action.copy
                a.create = a.create or action.create
                return
        self.actions.append(action)

    # --- commands -----------------------------------------------------------------------------
    def block(self, cmds) -> None:
        last_if_taken: bool | None = None
        for cmd in cmds:
            self.steps += 1
            if self.steps > self.max_steps:
                self.step()  # raises
            name = cmd.name
            if name == "if":
                last_if_taken = self.test(cmd.tests[0])
                if last_if_taken:
                    self.block(cmd.block)
                continue
            if name in ("elsif", "else"):
                if last_if_taken:
                    continue
                last_if_taken = True if name == "else" else self.test(cmd.tests[0])
                if last_if_taken:
                    self.block(cmd.block)
                continue
            last_if_taken = None
            self._commands[name](self, cmd)

    def c_require(self, cmd) -> None:
        pass

    def c_stop(self, cmd) -> None:
        raise _Stop

    def c_return(self, cmd) -> None:
        raise _Return

    def _flags_for(self, cmd) -> tuple:
        if "flags" in cmd.tagv:
            return tuple(_split_flags(self.s(cmd.tagv["flags"])))
        return tuple(self.flags)

    def c_keep(self, cmd) -> None:
        self.add_action(Action("keep", "INBOX", self._flags_for(cmd)))
        self.implicit_keep = False

    def c_discard(self, cmd) -> None:
        self.implicit_keep = False

    def c_fileinto(self, cmd) -> None:
        mailbox = self.s(cmd.posv[0])
        if not mailbox or "\x00" in mailbox:
            raise SieveRuntimeError(f"bad mailbox name {mailbox!r}")
        copy = bool(cmd.tagv.get("copy"))
        self.add_action(Action("fileinto", mailbox, self._flags_for(cmd), copy=copy,
                               create=bool(cmd.tagv.get("create"))))
        if not copy:
            self.implicit_keep = False

    def c_redirect(self, cmd) -> None:
        address = self.s(cmd.posv[0]).strip()
        if address.startswith("<") and address.endswith(">"):
            address = address[1:-1]
        if not _ADDR_SPEC.fullmatch(address):
            raise SieveRuntimeError(f"redirect to an invalid address {address!r}")
        self.redirects += 1
        if self.redirects > self.ctx.limits.max_redirects:
            raise SieveRuntimeError(f"more than {self.ctx.limits.max_redirects} redirects")
        copy = bool(cmd.tagv.get("copy"))
        self.add_action(Action("redirect", address, copy=copy))
        if not copy:
            self.implicit_keep = False

    def c_reject(self, cmd) -> None:
        self.add_action(Action("reject", self.s(cmd.posv[0])))
        self.implicit_keep = False

    def c_ereject(self, cmd) -> None:
        self.add_action(Action("ereject", self.s(cmd.posv[0])))
        self.implicit_keep = False

    # imap4flags
    def _flag_target(self, cmd) -> tuple[str | None, list[str]]:
        if len(cmd.posv) == 2:
            return self.s(cmd.posv[0]), _split_flags(self.s(cmd.posv[1]))
        return None, _split_flags(self.s(cmd.posv[0]))

    def _get_flags(self, var: str | None) -> list[str]:
        return list(self.flags) if var is None else _split_flags([self.frame.get(var)])

    def _put_flags(self, var: str | None, flags: list[str]) -> None:
        flags = list(dict.fromkeys(flags))
        if var is None:
            self.flags = flags
        else:
            self.frame.set(var, " ".join(flags))

    def c_setflag(self, cmd) -> None:
        var, flags = self._flag_target(cmd)
        self._put_flags(var, flags)

    def c_addflag(self, cmd) -> None:
        var, flags = self._flag_target(cmd)
        cur = self._get_flags(var)
        have = {f.lower() for f in cur}
        self._put_flags(var, cur + [f for f in flags if f.lower() not in have])

    def c_removeflag(self, cmd) -> None:
        var, flags = self._flag_target(cmd)
        drop = {f.lower() for f in flags}
        self._put_flags(var, [f for f in self._get_flags(var) if f.lower() not in drop])

    # variables
    def c_set(self, cmd) -> None:
        name = cmd.posv[0]  # a variable name is never expanded (RFC 5229 3)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SieveRuntimeError(f"bad variable name {name!r}")
        value = self.s(cmd.posv[1])
        t = cmd.tagv
        # case modifiers change ASCII letters only (as Pigeonhole; i;ascii-casemap is the default)
        if t.get("lower"):
            value = value.translate(_ASCII_LOWER)
        if t.get("upper"):
            value = value.translate(_ASCII_UPPER)
        if t.get("lowerfirst"):
            value = value[:1].translate(_ASCII_LOWER) + value[1:]
        if t.get("upperfirst"):
            value = value[:1].translate(_ASCII_UPPER) + value[1:]
        if t.get("quotewildcard"):
            value = match.quote_wildcards(value)
        if t.get("length"):
            value = str(len(value))
        self.frame.set(name, value)

    def c_global(self, cmd) -> None:
        for name in self.s(cmd.posv[0]):
            self.frame.global_names.add(name.lower())

    def c_include(self, cmd) -> None:
        name = self.s(cmd.posv[0])
        is_global = bool(cmd.tagv.get("global"))
        if "/" in name or name.startswith(".") or not name:
            raise SieveRuntimeError(f"bad script name {name!r} in include")
        key = (is_global, name)
        if cmd.tagv.get("once") and key in self.included_once:
            return
        self.included_once.add(key)
        if self.depth >= self.ctx.limits.max_include_depth:
            raise SieveRuntimeError("include nested too deeply")
        try:
            script = self.ctx.host.load_include(name, is_global)
        except SieveRuntimeError:
            raise
        except Exception as e:  # a script that does not compile is a run-time error here
            raise SieveRuntimeError(f"include {name!r}: {e}")
        if script is None:
            if cmd.tagv.get("optional"):
                return
            raise SieveRuntimeError(f"included script {name!r} not found")
        outer = self.frame
        self.frame = _Frame(script, self.globals)
        self.depth += 1
        try:
            self.block(script.commands)
        except _Return:
            pass
        finally:
            self.depth -= 1
            self.frame = outer

    # vacation
    def c_vacation(self, cmd) -> None:
        t = cmd.tagv
        if "seconds" in t:
            seconds = t["seconds"]
        else:
            seconds = t.get("days", 7) * 86400
        params = {
            "seconds": seconds,
            "subject": self.s(t["subject"]) if "subject" in t else None,
            "from": self.s(t["from"]) if "from" in t else None,
            "addresses": self.s(t.get("addresses", [])),
            "mime": bool(t.get("mime")),
            "handle": self.s(t["handle"]) if "handle" in t else None,
            "reason": self.s(cmd.posv[0]),
            "to": self.ctx.envelope_from,
        }
        if params["handle"] is None:
            # RFC 5230 4.2: the default handle depends on the reason, subject, from and mime
            raw = "\x00".join(str(params[k]) for k in ("reason", "subject", "from", "mime"))
            params["handle"] = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        self.add_action(Action("vacation", self.ctx.envelope_from, params=params))

    # editheader
    def c_addheader(self, cmd) -> None:
        name, value = self.s(cmd.posv[0]), self.s(cmd.posv[1])
        if not re.fullmatch(r"[!-9;-~]+", name) or name.lower() in PROTECTED_HEADERS:
            raise SieveRuntimeError(f"addheader: header {name!r} may not be added")
        if "\r" in value.replace("\r\n ", "").replace("\r\n\t", "") or "\n" in value.replace("\r\n", ""):
            raise SieveRuntimeError("addheader: bad line break in value")
        self.msg.add_header(name, value, bool(cmd.tagv.get("last")))

    def c_deleteheader(self, cmd) -> None:
        name = self.s(cmd.posv[0])
        if name.lower() in PROTECTED_HEADERS:
            raise SieveRuntimeError(f"deleteheader: header {name!r} may not be deleted")
        keys = self.s(cmd.posv[1]) if len(cmd.posv) == 2 else None
        t = cmd.tagv
        total = len(self.msg.headers(name))
        want = None
        if "index" in t:
            want = total - t["index"] + 1 if t.get("last") else t["index"]

        def delete(idx: int, value: str) -> bool:
            if want is not None and idx != want:
                return False
            if keys is None:
                return True
            return match.match_values([value], keys, t)
        self.msg.delete_header(name, delete)

    # --- tests ---------------------------------------------------------------------------------
    def test(self, test) -> bool:
        self.steps += 1
        if self.steps > self.max_steps:
            self.step()  # raises
        return bool(self._tests[test.name](self, test))

    def t_true(self, test) -> bool:
        return True

    def t_false(self, test) -> bool:
        return False

    def t_not(self, test) -> bool:
        return not self.test(test.tests[0])

    def t_allof(self, test) -> bool:
        return all(self.test(t) for t in test.tests)

    def t_anyof(self, test) -> bool:
        return any(self.test(t) for t in test.tests)

    def t_exists(self, test) -> bool:
        if test.tagv.get("anychild"):
            return all(self.msg.part_headers(h, True) for h in self.s(test.posv[0]))
        return all(self.msg.exists(h) for h in self.s(test.posv[0]))

    def t_size(self, test) -> bool:
        limit = test.posv[0]
        return self.msg.size > limit if test.tagv.get("over") else self.msg.size < limit

    def _match(self, values: list[str], keys: list[str], tagv: dict) -> bool:
        if self.frame.variables and "matches" in tagv:
            caps: list[str] = []
            hit = match.match_values(values, keys, tagv, caps)
            if hit:
                self.captures = caps
            return hit
        return match.match_values(values, keys, tagv)

    @staticmethod
    def _indexed(values: list[str], tagv: dict) -> list[str]:
        if "index" not in tagv:
            return values
        i = tagv["index"]
        pos = len(values) - i if tagv.get("last") else i - 1
        return [values[pos]] if 0 <= pos < len(values) else []

    def t_header(self, test) -> bool:
        t = test.tagv
        names = self.s(test.posv[0])
        if len(names) == 1 and "mime" not in t and "index" not in t:  # the common case, kept short
            return self._match(self.msg.headers(names[0]), self.s(test.posv[1]), t)
        values: list[str] = []
        for name in names:
            if t.get("mime"):
                raw = [v for v, _ in self.msg.part_headers(name, bool(t.get("anychild")))]
                values.extend(_mime_values(self._indexed(raw, t), t, self.s(t.get("param", []))))
            else:
                values.extend(self._indexed(self.msg.headers(name), t))
        return self._match(values, self.s(test.posv[1]), t)

    def t_address(self, test) -> bool:
        values: list[str] = []
        for name in self.s(test.posv[0]):
            if name.lower() not in _ADDRESS_HEADERS:
                # RFC 5228 5.1: only headers that hold addresses; others never match
                continue
            counting = "count" in test.tagv  # :count counts addresses, whatever part they lack
            for addr in self._indexed_addresses(name, test.tagv):
                part = _address_part(addr, test.tagv, self.ctx.separator)
                if part is not None or counting:
                    values.append(part or "")
        return self._match(values, self.s(test.posv[1]), test.tagv)

    def _indexed_addresses(self, name: str, tagv: dict) -> list[str]:
        if tagv.get("anychild"):
            return parse_addresses([v for v, _ in self.msg.part_headers(name, True)])
        if "index" not in tagv:
            return self.msg.addresses(name)
        return parse_addresses(self._indexed(self.msg.headers(name), tagv))

    def t_envelope(self, test) -> bool:
        values: list[str] = []
        for part in self.s(test.posv[0]):
            p = part.lower()
            if p == "from":
                addr = self.ctx.envelope_from
            elif p == "to":
                addr = self.ctx.envelope_to
            elif p == "auth":
                addr = self.ctx.meta.get("auth_user") or ""
                if not addr:
                    continue
            else:
                continue
            v = _address_part(addr, test.tagv, self.ctx.separator)
            if v is not None:
                values.append(v)
        return self._match(values, self.s(test.posv[1]), test.tagv)

    def t_mailboxexists(self, test) -> bool:
        return all(self.ctx.host.mailbox_exists(m) for m in self.s(test.posv[0]))

    def t_hasflag(self, test) -> bool:
        if len(test.posv) == 2:
            flags: list[str] = []
            for var in self.s(test.posv[0]):
                flags.extend(_split_flags([self.frame.get(var)]))
            keys = self.s(test.posv[1])
        else:
            flags, keys = list(self.flags), self.s(test.posv[0])
        if "count" not in test.tagv:
            keys = _split_flags(keys) if "matches" not in test.tagv else keys
        return self._match(flags, keys, test.tagv)

    def t_string(self, test) -> bool:
        values = self.s(test.posv[0])
        if "count" in test.tagv:
            values = [v for v in values if v != ""]  # RFC 5229 5: empty strings are not counted
        return self._match(values, self.s(test.posv[1]), test.tagv)

    def t_body(self, test) -> bool:
        t = test.tagv
        if t.get("raw"):
            values = [self.msg.body_raw()]
        elif "content" in t:
            values = self.msg.body_parts(self.s(t["content"]))
        else:
            values = self.msg.body_parts(["text"])
        # no match variables from body (as Pigeonhole): a body is not a value to carry around
        return match.match_values(values, self.s(test.posv[0]), t)

    def _zone_date(self, d: dt.datetime, tagv: dict) -> dt.datetime:
        if tagv.get("originalzone"):
            return d
        if "zone" in tagv:
            z = datex.parse_zone(self.s(tagv["zone"]))
            if z is None:
                return d
            return d.astimezone(z)
        return d.astimezone()  # the local zone of the server

    def t_date(self, test) -> bool:
        header, part, keys = self.s(test.posv[0]), self.s(test.posv[1]), self.s(test.posv[2])
        values = []
        for raw in self._indexed(self.msg.headers(header), test.tagv):
            d = datex.header_date(raw)
            if d is None:
                continue
            v = datex.date_part(self._zone_date(d, test.tagv), part)
            if v is not None:
                values.append(v)
        return self._match(values, keys, test.tagv)

    def t_currentdate(self, test) -> bool:
        part, keys = self.s(test.posv[0]), self.s(test.posv[1])
        now = self.ctx.now or dt.datetime.now(dt.timezone.utc)
        v = datex.date_part(self._zone_date(now, test.tagv), part)
        return self._match([v] if v is not None else [], keys, test.tagv)

    def t_spamtest(self, test) -> bool:
        value = spamtest_value(self.ctx.meta, bool(test.tagv.get("percent")))
        return self._match([value], [self.s(test.posv[0])], test.tagv)

    def t_virustest(self, test) -> bool:
        return self._match([virustest_value(self.ctx.meta)], [self.s(test.posv[0])], test.tagv)

    def t_environment(self, test) -> bool:
        name = self.s(test.posv[0]).lower()
        value = self.ctx.environment.get(name)
        if value is None:
            return False
        return self._match([value], self.s(test.posv[1]), test.tagv)

    def t_duplicate(self, test) -> bool:
        t = test.tagv
        if "uniqueid" in t:
            uid = self.s(t["uniqueid"])
        else:
            values = self.msg.headers(self.s(t.get("header", "Message-ID")))
            if not values:
                return False  # RFC 7352 3.1: no such header: never a duplicate
            uid = values[0].strip()
        handle = self.s(t.get("handle", ""))
        key = hashlib.sha256(f"{handle}\x00{uid}".encode("utf-8", "surrogatepass")).hexdigest()
        seconds = int(t.get("seconds", 7 * 86400))
        seen = self.ctx.host.duplicate_seen(key)
        if not seen or t.get("last"):
            self.duplicate_marks.append((key, seconds))
        return seen


_ADDR_SPEC = re.compile(r"[^\s@<>()\[\],;:\"]+@[^\s@<>()\[\],;:\"]+")


def _address_part(addr: str, tagv: dict, sep: str = SUBADDRESS_SEPARATOR) -> str | None:
    if isinstance(addr, RawAddress):  # no address could be read: only :all sees the value
        return None if any(tagv.get(p) for p in ("localpart", "domain", "user", "detail")) else str(addr)
    local, at, domain = addr.rpartition("@")
    if not at:
        local, domain = addr, ""
    if tagv.get("localpart"):
        return local
    if tagv.get("domain"):
        return domain
    if tagv.get("user"):
        return local.split(sep, 1)[0] if sep else local
    if tagv.get("detail"):
        if not sep or sep not in local:
            return None  # RFC 5233: no detail part: the test does not match this address
        return local.split(sep, 1)[1]
    return addr


def _mime_values(values: list[str], tagv: dict, params: list[str]) -> list[str]:
    """RFC 5703 4.2: :type, :subtype, :contenttype or :param of structured MIME header values."""
    if not ({"type", "subtype", "contenttype", "param"} & tagv.keys()):
        return values
    out = []
    for v in values:
        main, _, rest = v.partition(";")
        ctype = main.strip().lower()
        typ, _, sub = ctype.partition("/")
        if tagv.get("type"):
            out.append(typ)
        elif tagv.get("subtype"):
            out.append(sub)
        elif tagv.get("contenttype"):
            out.append(ctype)
        else:
            from email.message import Message
            m = Message()
            m["Content-Type"] = "x/x;" + rest
            want = {p.lower() for p in params}
            for k, val in m.get_params()[1:]:
                if k.lower() in want:
                    out.append(email.utils.collapse_rfc2231_value(val))
    return out


def _split_flags(values) -> list[str]:
    out: list[str] = []
    for v in values:
        out.extend(v.split())
    return list(dict.fromkeys(out))


Interpreter._commands = {n[2:]: f for n, f in vars(Interpreter).items() if n.startswith("c_")}
Interpreter._tests = {n[2:]: f for n, f in vars(Interpreter).items() if n.startswith("t_")}


def evaluate(scripts: list[Script], ctx: Context) -> Result:
    return Interpreter(ctx).run(scripts)
