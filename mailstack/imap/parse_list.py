"""Grammar of the mailbox-listing extensions, pure (a parser.py cursor in, dicts out):

* LIST-EXTENDED (RFC 5258): selection options, several patterns, RETURN options;
  LIST-STATUS (RFC 5819) `RETURN (STATUS (...))`; SPECIAL-USE (RFC 6154) as a selection
  and a return option;
* CREATE-SPECIAL-USE (RFC 6154 section 3): `CREATE name (USE (\\Archive))`;
* UTF8=ACCEPT (RFC 6855 section 4): APPEND's `UTF8 (~{n}literal8)` message.

parser.py registers these in its COMMANDS table; they use only the cursor's methods, so
this module does not import parser.py (no import cycle).
"""
from __future__ import annotations

SELECT_OPTIONS = {"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"}
# RECURSIVEMATCH needs one of these beside it (RFC 5258 section 3.1; RFC 6154 section 5.1)
BASE_SELECT_OPTIONS = {"SUBSCRIBED", "SPECIAL-USE"}
RETURN_OPTIONS = {"SUBSCRIBED", "CHILDREN", "SPECIAL-USE", "STATUS"}
MAX_PATTERNS = 32  # several patterns in one LIST: bounded like everything from the network
MAX_USES = 8


def _option_list(c, known: set[str], what: str, status_items: frozenset | None = None) -> tuple[list[str], list[str]]:
    """'(' [option *(SP option)] ')' -> (options, STATUS items); unknown options are BAD
    (RFC 5258 section 3: a server must not ignore an option it does not know)."""
    c.expect(b"(")
    options: list[str] = []
    items: list[str] = []
    if c.peek() == 0x29:
        c.pos += 1
        return options, items
    while True:
        opt = c.atom(what).upper()
        if opt not in known:
            raise c.error(f"unknown LIST {what} {opt}"[:80])
        if opt == "STATUS":
            c.sp()
            items += status_atts(c, status_items or frozenset())
        options.append(opt)
        if c.peek() == 0x29:
            c.pos += 1
            return options, items
        c.sp()


def status_atts(c, allowed: frozenset) -> list[str]:
    """'(' status-att *(SP status-att) ')' (STATUS and LIST ... RETURN (STATUS ...))."""
    c.expect(b"(")
    items: list[str] = []
    while True:
        item = c.atom("status item").upper()
        if item not in allowed:
            raise c.error(f"unknown STATUS item {item}"[:80])
        if item not in items:
            items.append(item)
        if c.peek() == 0x29:
            c.pos += 1
            return items
        c.sp()


def list_command(c, status_items: frozenset) -> dict:
    """LIST [SP list-select-opts] SP mailbox SP mbox-or-pat [SP list-return-opts]."""
    c.sp()
    extended = False
    selection: list[str] = []
    if c.peek() == 0x28:
        extended = True
        selection, _ = _option_list(c, SELECT_OPTIONS, "selection option")
        if "RECURSIVEMATCH" in selection and not BASE_SELECT_OPTIONS & set(selection):
            raise c.error("RECURSIVEMATCH needs SUBSCRIBED or SPECIAL-USE beside it")
        c.sp()
    reference = c.list_reference()
    c.sp()
    if c.peek() == 0x28:
        extended = True
        c.pos += 1
        patterns = []
        while c.peek() != 0x29:
            if patterns:
                c.sp()
            patterns.append(c.list_mailbox())
            if len(patterns) > MAX_PATTERNS:
                raise c.error("too many LIST patterns")
        c.pos += 1
    else:
        patterns = [c.list_mailbox()]
    returns: list[str] = []
    items: list[str] = []
    if c.maybe_sp():
        if c.atom("RETURN").upper() != "RETURN":
            raise c.error("expected RETURN")
        c.sp()
        extended = True
        returns, items = _option_list(c, RETURN_OPTIONS, "return option", status_items)
    return {"reference": reference, "patterns": patterns, "selection": set(selection),
            "returns": set(returns), "status_items": list(dict.fromkeys(items)), "extended": extended,
            # the basic form's single pattern, for code that knows only RFC 3501 LIST
            "pattern": patterns[0] if len(patterns) == 1 else None}


def create_params(c) -> list[str] | None:
    """'(' create-param *(SP create-param) ')' of RFC 4466; only USE (RFC 6154) is known.
    Returns the special-use attributes asked for (None when no USE was given)."""
    c.expect(b"(")
    uses: list[str] | None = None
    while True:
        name = c.atom("CREATE parameter").upper()
        if name != "USE" or uses is not None:
            raise c.error(f"unknown CREATE parameter {name}"[:80])
        c.sp()
        c.expect(b"(")
        uses = []
        while c.peek() != 0x29:
            if uses:
                c.sp()
            c.expect(b"\\")
            uses.append("\\" + c.atom("special-use attribute"))
            if len(uses) > MAX_USES:
                raise c.error("too many special-use attributes")
        c.pos += 1
        if c.peek() == 0x29:
            c.pos += 1
            return uses
        c.sp()


def append_utf8_data(c) -> bytes | None:
    """RFC 6855 section 4: `UTF8 (~{n}literal8)`; None when the message is not in that form
    (the cursor is then where it was)."""
    if c.line[c.pos:c.pos + 6].upper() != b"UTF8 (":
        return None
    c.pos += 6
    if c.peek() != 0x7E:  # "~": a literal8
        raise c.error("APPEND UTF8 needs the message as a literal8 (~{n})")
    c.pos += 1
    if not c.is_literal_here():
        raise c.error("APPEND UTF8 needs the message as a literal8 (~{n})")
    message = c.literal()
    c.expect(b")")
    return message
