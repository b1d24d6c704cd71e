"""LIST-EXTENDED (RFC 5258), LIST-STATUS (RFC 5819), SPECIAL-USE selection/return options and
CREATE-SPECIAL-USE (RFC 6154), STATUS SIZE/DELETED (RFC 8438, RFC 9051): RFC 5258's
examples, the same commands side by side with a real Dovecot, imapclient/imaplib, and
hypothesis over the grammar.  UTF8=ACCEPT and IMAP4rev2: tests/test_imap_utf8_rev2.py."""
from __future__ import annotations

import re
import socket
import ssl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dovecot_fixture import Dovecot
from imap_fixtures import HOST, InProcessIMAP
from mailstack.imap.parser import ParseError, parse_command

ALICE, PW = "alice@example.test", "secret"
DEFAULT_FOLDERS = ("Drafts", "Sent", "Trash", "Junk", "Archive")  # made for every new account
MSG = (b"From: a@example.org\r\nTo: alice@example.test\r\nSubject: s%d\r\n"
       b"Message-ID: <m%d@example.org>\r\n\r\nbody %d\r\n")


class Client:
    """A line-level IMAP client for any server (mailstack or Dovecot)."""

    def __init__(self, port: int, ctx: ssl.SSLContext, user: str, password: str) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = ctx.wrap_socket(sock, server_hostname=HOST)
        self.buf = b""
        self.n = 0
        self.line()
        assert self.cmd(f"LOGIN {user} {password}")[1] == "OK"

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        m = re.search(rb"\{(\d+)\}$", line)
        if m:
            need = int(m.group(1))
            while len(self.buf) < need:
                self.buf += self.sock.recv(65536)
            lit, self.buf = self.buf[:need], self.buf[need:]
            return line + b"\r\n" + lit + self.line()
        return line

    def cmd(self, text: str | bytes) -> tuple[list[bytes], str, bytes]:
        """(untagged lines, OK/NO/BAD, tagged line)."""
        self.n += 1
        tag = b"c%d" % self.n
        data = text.encode() if isinstance(text, str) else text
        self.sock.sendall(tag + b" " + data + b"\r\n")
        lines = []
        while True:
            line = self.line()
            if line.startswith(tag + b" "):
                return lines, line.split()[1].decode(), line
            lines.append(line)

    def ok(self, text) -> list[bytes]:
        lines, status, tagged = self.cmd(text)
        assert status == "OK", (text, lines, tagged)
        return lines

    def close(self) -> None:
        try:
            self.cmd("LOGOUT")
        except (OSError, EOFError):
            pass
        self.sock.close()


_LIST_RE = re.compile(rb'^\* LIST \(([^)]*)\) "/" ("(?:[^"\\]|\\.)*"|[^ ]+)(?: (.*))?$')


def parse_list_line(line: bytes) -> tuple[str, frozenset, str]:
    """(name, attributes, extended data) of one `* LIST`, quoting and case normalised."""
    m = _LIST_RE.match(line)
    assert m, line
    name = m.group(2)
    if name.startswith(b'"'):
        name = re.sub(rb'\\(.)', rb"\1", name[1:-1])
    ext = (m.group(3) or b"").decode().replace('"', "").upper()
    return name.decode(), frozenset(a.lower() for a in m.group(1).decode().split()), ext


def listing(lines: list[bytes]) -> list[tuple]:
    """LIST rows each with the STATUS that follows it (RFC 5819: right after its LIST)."""
    rows = []
    for line in lines:
        if line.startswith(b"* LIST "):
            rows.append([*parse_list_line(line), None])
        elif line.startswith(b"* STATUS "):
            m = re.match(rb'^\* STATUS ("(?:[^"\\]|\\.)*"|[^ ]+) \((.*)\)$', line)
            name = m.group(1).strip(b'"').decode()
            assert rows and rows[-1][0] == name and rows[-1][3] is None, ("STATUS not after its LIST", lines)
            items = m.group(2).decode().split()
            rows[-1][3] = dict(zip(items[::2], items[1::2]))
    return sorted(tuple(r[:3]) + (tuple(sorted(r[3].items())) if r[3] else None,) for r in rows)


def rows(client: Client, command: str) -> dict[str, tuple]:
    """name -> (attributes, extended data) of a LIST that must succeed."""
    out = {}
    for name, attrs, ext, _ in listing(client.ok(command)):
        out[name] = (set(attrs), ext)
    return out


# ---------------------------------------------------------------------------- servers

@pytest.fixture
def srv(tmp_path):
    s = InProcessIMAP(tmp_path)
    yield s
    s.close()


def _ctx(srv) -> ssl.SSLContext:
    ctx = srv.client_tls()
    ctx.check_hostname = False
    return ctx


@pytest.fixture
def alice(srv):
    """A session on an account holding only INBOX, nothing subscribed (the RFC examples'
    starting point)."""
    c = Client(srv.ports["imaps"], _ctx(srv), ALICE, PW)
    for name in DEFAULT_FOLDERS:
        c.ok(f"DELETE {name}")
        c.ok(f"UNSUBSCRIBE {name}")
    c.ok("UNSUBSCRIBE INBOX")
    yield c
    c.close()


@pytest.fixture(scope="module")
def dovecot():
    dc = Dovecot().start()
    dc.add_user("u@example.test", "pw")
    yield dc
    dc.cleanup()


# ------------------------------------------------------------------- RFC 5258 section 5

def _rfc5258_hierarchy(c: Client) -> None:
    """The mailboxes of RFC 5258's examples 1 to 6 (without the remote ones)."""
    for name in ("Fruit", "Fruit/Apple", "Fruit/Banana", "Fruit/Peach", "Tofu", "Vegetable",
                 "Vegetable/Broccoli", "Vegetable/Corn"):
        c.ok(f"CREATE {name}")
    for name in ("INBOX", "Fruit/Banana", "Fruit/Peach", "Vegetable", "Vegetable/Broccoli"):
        c.ok(f"SUBSCRIBE {name}")
    c.ok("DELETE Fruit/Peach")  # subscribed, no longer there


def test_rfc5258_examples_1_to_6(alice):
    c = alice
    _rfc5258_hierarchy(c)
    everything = ["INBOX", "Fruit", "Fruit/Apple", "Fruit/Banana", "Tofu", "Vegetable",
                  "Vegetable/Broccoli", "Vegetable/Corn"]
    # 1: the whole hierarchy
    assert sorted(rows(c, 'LIST "" "*"')) == sorted(everything)
    # 2: subscribed ones, the one that no longer exists as \NonExistent
    assert rows(c, 'LIST (SUBSCRIBED) "" "*"') == {
        "INBOX": ({"\\subscribed"}, ""), "Fruit/Banana": ({"\\subscribed"}, ""),
        "Fruit/Peach": ({"\\subscribed", "\\nonexistent"}, ""), "Vegetable": ({"\\subscribed"}, ""),
        "Vegetable/Broccoli": ({"\\subscribed"}, "")}
    # 3: children known without listing the second level
    example3 = {"INBOX": ({"\\hasnochildren"}, ""), "Fruit": ({"\\haschildren"}, ""),
                "Tofu": ({"\\hasnochildren"}, ""), "Vegetable": ({"\\haschildren"}, "")}
    assert rows(c, 'LIST () "" "%" RETURN (CHILDREN)') == example3
    # 4: REMOTE (this server has no remote mailboxes: the same answer)
    assert rows(c, 'LIST (REMOTE) "" "%" RETURN (CHILDREN)') == example3
    # 5: REMOTE SUBSCRIBED = 2
    assert rows(c, 'LIST (REMOTE SUBSCRIBED) "" "*"') == rows(c, 'LIST (SUBSCRIBED) "" "*"')
    # 6: every mailbox, \Subscribed where it is; the subscribed non-existent one not listed
    six = rows(c, 'LIST (REMOTE) "" "*" RETURN (SUBSCRIBED)')
    assert sorted(six) == sorted(everything)
    assert {n for n, (a, _) in six.items() if "\\subscribed" in a} == {
        "INBOX", "Fruit/Banana", "Vegetable", "Vegetable/Broccoli"}


def test_rfc5258_example_7_multiple_patterns(alice):
    c = alice
    for name in ("Drafts", "Sent/March2004", "Sent/December2003", "Sent/August2004", "Sent/Old/x", "Trash"):
        c.ok(f"CREATE {name}")
    got = rows(c, 'LIST "" ("INBOX" "Drafts" "Sent/%")')
    assert sorted(got) == ["Drafts", "INBOX", "Sent/August2004", "Sent/December2003", "Sent/March2004", "Sent/Old"]
    assert all(attrs == set() for attrs, _ in got.values())  # no RETURN option, no attributes
    # a name matched by two patterns is listed once
    lines = c.ok('LIST "" ("INBOX" "INBOX" "I*")')
    assert len(lines) == 1


def test_rfc5258_example_8_childinfo(alice):
    c = alice
    for name in ("Foo2", "Foo2/Bar1", "Foo2/Bar2", "Baz2", "Baz2/Bar2", "Baz2/Bar22", "Baz2/Bar222",
                 "Eps2", "Eps2/Mamba", "Qux2/Bar2"):
        c.ok(f"CREATE {name}")
    c.ok("DELETE Qux2")  # only its child exists
    for name in ("Foo2/Bar1", "Foo2/Bar2", "Baz2/Bar2", "Baz2/Bar22", "Baz2/Bar222", "Eps2",
                 "Eps2/Mamba", "Qux2/Bar2"):
        c.ok(f"SUBSCRIBE {name}")
    assert rows(c, 'LIST (SUBSCRIBED RECURSIVEMATCH) "" "*2"') == {
        "Foo2": (set(), "(CHILDINFO (SUBSCRIBED))"),
        "Foo2/Bar2": ({"\\subscribed"}, ""),
        "Baz2/Bar2": ({"\\subscribed"}, ""), "Baz2/Bar22": ({"\\subscribed"}, ""),
        "Baz2/Bar222": ({"\\subscribed"}, ""),
        "Eps2": ({"\\subscribed"}, "(CHILDINFO (SUBSCRIBED))"),
        "Qux2/Bar2": ({"\\subscribed"}, "")}


def test_rfc5258_example_9_haschildren_and_childinfo(alice):
    c = alice
    for name in ("Foo", "Foo/Bar", "Foo/Baz", "Moo"):
        c.ok(f"CREATE {name}")
    assert rows(c, 'LIST "" "%" RETURN (CHILDREN)') == {
        "INBOX": ({"\\hasnochildren"}, ""), "Foo": ({"\\haschildren"}, ""), "Moo": ({"\\hasnochildren"}, "")}
    c.ok("SUBSCRIBE Foo/Baz")
    assert rows(c, 'LIST (SUBSCRIBED) "" "%"') == {}
    assert rows(c, 'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%" RETURN (CHILDREN)') == {
        "Foo": ({"\\haschildren"}, "(CHILDINFO (SUBSCRIBED))")}
    c.ok("SUBSCRIBE Foo")
    c.ok("SUBSCRIBE Moo")
    assert rows(c, 'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%" RETURN (CHILDREN)') == {
        "Foo": ({"\\subscribed", "\\haschildren"}, "(CHILDINFO (SUBSCRIBED))"),
        "Moo": ({"\\subscribed", "\\hasnochildren"}, "")}


def test_nonexistent_parent_basic_and_extended(alice):
    c = alice
    c.ok("CREATE music/rock")
    c.ok("DELETE music")
    assert rows(c, 'LIST "" "%"')["music"] == ({"\\noselect", "\\haschildren"}, "")  # RFC 3501
    assert rows(c, 'LIST () "" "%"')["music"] == ({"\\nonexistent"}, "")
    assert rows(c, 'LIST "" "%" RETURN (CHILDREN)')["music"] == ({"\\nonexistent", "\\haschildren"}, "")
    c.ok("SUBSCRIBE music/rock")
    assert rows(c, 'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"') == {
        "music": ({"\\nonexistent"}, "(CHILDINFO (SUBSCRIBED))")}


def test_list_grammar_errors_are_bad(alice):
    for bad in ('LIST (RECURSIVEMATCH) "" "%"', 'LIST (REMOTE RECURSIVEMATCH) "" "%"',
                'LIST (FOO) "" "%"', 'LIST "" "%" RETURN (FOO)', 'LIST "" "%" RETURN (STATUS ())',
                'LIST "" "%" RETURN (STATUS (FOO))', 'LIST "" "%" RETURN', 'LIST "" "%" FOO (CHILDREN)',
                'LIST "" ("a" "b"', 'LIST "" (' + " ".join(['"x"'] * 40) + ")"):
        lines, status, tagged = alice.cmd(bad)
        assert status == "BAD" and not lines, (bad, tagged)
    alice.ok("NOOP")  # the session goes on


# --------------------------------------------------------------------- LIST-STATUS

def test_list_status_one_status_after_each_selectable_mailbox(srv, alice):
    c = alice
    c.ok("CREATE Work/Projects")
    c.ok("CREATE Gone/Child")
    c.ok("DELETE Gone")
    sizes = []
    for i in range(3):
        m = MSG % (i, i, i)
        sizes.append(len(m))
        srv.deliver(ALICE, m, "Work/Projects", flags=["\\Seen"] if i == 0 else ["\\Deleted"] if i == 1 else [])
    lines = c.ok('LIST "" "*" RETURN (STATUS (MESSAGES UNSEEN SIZE DELETED UIDNEXT))')
    got = {r[0]: (r[1], r[3]) for r in listing(lines)}
    assert got["Work/Projects"][1] == (("DELETED", "1"), ("MESSAGES", "3"), ("SIZE", str(sum(sizes))),
                                       ("UIDNEXT", "4"), ("UNSEEN", "2"))
    assert got["Gone"][0] == {"\\nonexistent"} and got["Gone"][1] is None  # no STATUS for it
    assert got["INBOX"][1] == (("DELETED", "0"), ("MESSAGES", "0"), ("SIZE", "0"), ("UIDNEXT", "1"), ("UNSEEN", "0"))
    # STATUS follows its own LIST line, and only selectable mailboxes have one
    assert sum(1 for line in lines if line.startswith(b"* STATUS")) == len(got) - 1
    # the same numbers from STATUS itself, items in the order asked
    lines = c.ok('STATUS Work/Projects (SIZE DELETED MESSAGES)')
    assert lines == [b"* STATUS Work/Projects (SIZE %d DELETED 1 MESSAGES 3)" % sum(sizes)]


# --------------------------------------------------------------------- SPECIAL-USE

def test_special_use_selection_and_return_options(srv):
    c = Client(srv.ports["imaps"], _ctx(srv), ALICE, PW)
    c.ok("CREATE Sent/2023")
    c.ok("SUBSCRIBE Sent")
    specials = {"Archive": "\\archive", "Drafts": "\\drafts", "Junk": "\\junk", "Sent": "\\sent", "Trash": "\\trash"}
    assert rows(c, 'LIST (SPECIAL-USE) "" "*"') == {n: ({a}, "") for n, a in specials.items()}
    got = rows(c, 'LIST (SPECIAL-USE) "" "*" RETURN (CHILDREN)')
    assert got["Sent"] == ({"\\sent", "\\haschildren"}, "") and got["Trash"] == ({"\\trash", "\\hasnochildren"}, "")
    c.ok("UNSUBSCRIBE Junk")
    assert rows(c, 'LIST (SPECIAL-USE SUBSCRIBED) "" "*"') == {
        n: ({a, "\\subscribed"}, "") for n, a in specials.items() if n != "Junk"}
    got = rows(c, 'LIST "" "*" RETURN (SPECIAL-USE)')
    assert got["INBOX"] == (set(), "") and got["Sent/2023"] == (set(), "") and got["Junk"] == ({"\\junk"}, "")
    # extended LIST without the option: no special-use attributes (as Dovecot); basic LIST: always
    assert rows(c, 'LIST () "" "Junk"') == {"Junk": (set(), "")}
    assert rows(c, 'LIST "" "Junk"') == {"Junk": ({"\\junk", "\\hasnochildren"}, "")}
    c.close()


def test_create_special_use(srv):
    c = Client(srv.ports["imaps"], _ctx(srv), ALICE, PW)
    c.ok("DELETE Archive")
    lines, status, tagged = c.cmd("CREATE Old/Archived (USE (\\archive))")
    assert status == "OK", tagged
    assert rows(c, 'LIST (SPECIAL-USE) "" "Old/*"') == {"Old/Archived": ({"\\archive"}, "")}
    # kept on disk with the folder (store/maildir.py: mailstack-special-use), seen by another session
    path = srv.cfg.mail_dir / "example.test" / "alice" / ".Old.Archived" / "mailstack-special-use"
    assert path.read_text().strip() == "\\Archive"
    c2 = Client(srv.ports["imaps"], _ctx(srv), ALICE, PW)
    assert rows(c2, 'LIST "" "Old/%"') == {"Old/Archived": ({"\\archive", "\\hasnochildren"}, "")}
    # RENAME takes it along
    c2.ok("RENAME Old/Archived Kept")
    assert rows(c2, 'LIST (SPECIAL-USE) "" "Kept"') == {"Kept": ({"\\archive"}, "")}
    for bad, why in (("CREATE x1 (USE (\\Foo))", b"not a special use"),
                     ("CREATE x2 (USE (\\All))", b"virtual"), ("CREATE x3 (USE (\\Flagged))", b"virtual"),
                     ("CREATE x4 (USE (\\Drafts \\Sent))", b"one special use"),
                     ("CREATE x5 (USE (\\Sent))", b"already the special use of Sent"),
                     ("CREATE x6 (USE (\\Archive))", b"already the special use of Kept")):
        lines, status, tagged = c.cmd(bad)
        assert status == "NO" and b"[USEATTR]" in tagged and why in tagged, (bad, tagged)
    for bad in ("CREATE y1 (FOO (\\Sent))", "CREATE y2 (USE \\Sent)", "CREATE y3 (USE (Sent))",
                "CREATE y4 (USE (\\Sent)"):
        assert c.cmd(bad)[1] == "BAD", bad
    assert not [n for n in rows(c, 'LIST "" "*"') if n[:1] in "xy" and len(n) == 2]  # nothing made
    lines, status, _ = c.cmd("CREATE Plain (USE ())")
    assert status == "OK" and rows(c, 'LIST "" "Plain"') == {"Plain": ({"\\hasnochildren"}, "")}
    c.close()
    c2.close()


# ------------------------------------------------------------------ real client libraries

def test_imapclient_list_status_and_special_folders(srv):
    from imapclient import IMAPClient
    from imapclient.imapclient import SENT, TRASH
    srv.deliver(ALICE, MSG % (1, 1, 1), "Sent")
    with IMAPClient("127.0.0.1", port=srv.ports["imaps"], ssl=True, ssl_context=_ctx(srv)) as c:
        c.login(ALICE, PW)
        for cap in (b"LIST-EXTENDED", b"LIST-STATUS", b"STATUS=SIZE", b"CREATE-SPECIAL-USE", b"UTF8=ACCEPT"):
            assert c.has_capability(cap.decode()), cap
        assert c.find_special_folder(SENT) == "Sent" and c.find_special_folder(TRASH) == "Trash"
        c.create_folder("Größe/Ünter")
        names = {f[2]: f[0] for f in c.list_folders()}
        assert b"\\HasChildren" in names["Größe"] and b"\\HasNoChildren" in names["Größe/Ünter"]
        assert c.folder_status("Sent", ["MESSAGES", "SIZE", "DELETED"]) == {
            b"MESSAGES": 1, b"SIZE": len(MSG % (1, 1, 1)), b"DELETED": 0}
        # extended LIST through imapclient's raw command path: the response parser copes
        typ, data = c._imap._simple_command("LIST", '(SPECIAL-USE)', '""', '"*"', "RETURN", "(STATUS (MESSAGES SIZE))")
        assert typ == "OK"
        typ, data = c._imap._untagged_response(typ, data, "STATUS")
        assert any(b"Sent (MESSAGES 1 SIZE" in d for d in data), data


# ------------------------------------------------------------------- side by side with Dovecot

SETUP = [
    "CREATE Fruit", "CREATE Fruit/Apple", "CREATE Fruit/Banana", "CREATE Fruit/Peach", "CREATE Tofu",
    "CREATE Vegetable", "CREATE Vegetable/Broccoli", "CREATE Vegetable/Corn",
    "CREATE music/rock", "DELETE music", "CREATE Foo2", "CREATE Eps2", "CREATE Foo2/Bar1", "CREATE Foo2/Bar2", "CREATE Eps2/Mamba",
    "SUBSCRIBE INBOX", "SUBSCRIBE Fruit/Banana", "SUBSCRIBE Fruit/Peach", "SUBSCRIBE Vegetable",
    "SUBSCRIBE Vegetable/Broccoli", "SUBSCRIBE music/rock", "SUBSCRIBE Foo2/Bar1", "SUBSCRIBE Eps2",
    "SUBSCRIBE Eps2/Mamba", "DELETE Fruit/Peach", "CREATE Sent", "CREATE Drafts", "CREATE Sent/Old",
    "SUBSCRIBE Sent",
]
QUERIES = [
    'LIST "" "*"', 'LIST "" "%"', 'LIST "" "Fruit/%"', 'LIST "Fruit/" "%"', 'LIST "" ""',
    'LIST (SUBSCRIBED) "" "*"', 'LIST (SUBSCRIBED) "" "%"', 'LIST () "" "%" RETURN (CHILDREN)',
    'LIST (REMOTE) "" "%" RETURN (CHILDREN)', 'LIST (REMOTE SUBSCRIBED) "" "*"',
    'LIST (REMOTE) "" "*" RETURN (SUBSCRIBED)', 'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"',
    'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%" RETURN (CHILDREN)', 'LIST (SUBSCRIBED RECURSIVEMATCH) "" "*2"',
    'LIST (SUBSCRIBED RECURSIVEMATCH) "" "music"', 'LIST "" ("INBOX" "Fruit/%")',
    'LIST "" ("INBOX" "Tofu" "Vegetable/%") RETURN (CHILDREN)', 'LIST "" "%" RETURN (SUBSCRIBED)',
    'LIST "" "*" RETURN (STATUS (MESSAGES UNSEEN SIZE))',
    'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%" RETURN (STATUS (MESSAGES) CHILDREN)',
    'LIST (SPECIAL-USE) "" "*"', 'LIST (SPECIAL-USE) "" "*" RETURN (CHILDREN)',
    'LIST "" "*" RETURN (SPECIAL-USE)', 'LIST (SPECIAL-USE SUBSCRIBED) "" "*"',
    'LIST (SPECIAL-USE RECURSIVEMATCH) "" "%"', 'LIST (SUBSCRIBED) "" ""', 'LIST () "" "%"',
    'LIST "" "%" RETURN ()', 'LIST (RECURSIVEMATCH) "" "%"', 'LIST (FOO) "" "%"',
    'LIST "" "%" RETURN (FOO)', 'LIST "" "%" RETURN (STATUS ())', 'STATUS Tofu (MESSAGES UNSEEN SIZE)',
    'NAMESPACE',
    # as MailKit asks when LIST-EXTENDED is offered; as clients find Sent/Drafts/Trash
    'LIST "" "%" RETURN (SUBSCRIBED CHILDREN)', 'LIST "" "*" RETURN (SUBSCRIBED CHILDREN SPECIAL-USE)',
]


def test_same_answers_as_dovecot(srv, dovecot):
    ours = Client(srv.ports["imaps"], _ctx(srv), ALICE, PW)
    for name in DEFAULT_FOLDERS:
        ours.ok(f"DELETE {name}")
        ours.ok(f"UNSUBSCRIBE {name}")
    theirs = Client(dovecot.imaps_port, dovecot.client_tls(), "u@example.test", "pw")
    for c in (ours, theirs):
        for command in SETUP:
            if command in ("CREATE Sent", "CREATE Drafts") and c is ours:
                command += " (USE (\\" + command.split()[1] + "))"  # Dovecot has them in its config
            c.cmd(command)  # Dovecot refuses DELETE of a name that is only a parent: no matter
        for i in range(2):  # sizes and counts for LIST-STATUS and STATUS=SIZE
            m = MSG % (i, i, i)
            c.ok(b"APPEND Tofu (%s) {%d+}\r\n" % (b"\\Seen" if i else b"", len(m)) + m)
    differences = []
    for q in QUERIES:
        a_lines, a_status, _ = ours.cmd(q)
        b_lines, b_status, _ = theirs.cmd(q)
        if q.startswith("LIST"):
            a, b = listing(a_lines), listing(b_lines)
        else:
            a, b = sorted(a_lines), sorted(b_lines)
        if (a_status, a) != (b_status, b):
            differences.append((q, a_status, a, b_status, b))
    ours.close()
    theirs.close()
    assert not differences, "\n".join(map(repr, differences))


# ------------------------------------------------------------------------- the grammar

def parse(line: bytes):
    return parse_command([line])


def test_list_extended_grammar():
    a = parse(b'a LIST (SUBSCRIBED REMOTE RECURSIVEMATCH) "ref/" ("INBOX" Sent* %x) RETURN (CHILDREN SUBSCRIBED '
              b'STATUS (MESSAGES SIZE DELETED) SPECIAL-USE)').args
    assert a["selection"] == {"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH"} and a["reference"] == "ref/"
    assert a["patterns"] == ["INBOX", "Sent*", "%x"] and a["extended"]
    assert a["returns"] == {"CHILDREN", "SUBSCRIBED", "STATUS", "SPECIAL-USE"}
    assert a["status_items"] == ["MESSAGES", "SIZE", "DELETED"]
    a = parse(b'a LIST "" "*"').args
    assert not a["extended"] and a["patterns"] == ["*"] and a["pattern"] == "*"
    assert parse(b'a LIST () "" %').args["extended"]
    assert parse(b'a LIST "" % RETURN ()').args["extended"]
    assert parse(b"a LIST \"\" Entw&APw-rfe").args["patterns"] == ["Entwürfe"]
    assert parse(b"a LIST \"\" &Jjo").args["patterns"] == [None]  # bad modified UTF-7 matches nothing
    # LSUB keeps RFC 3501's grammar
    with pytest.raises(ParseError):
        parse(b'a LSUB (SUBSCRIBED) "" "*"')
    assert parse(b"a CREATE x (USE (\\Sent))").args == {"mailbox": "x", "use": ["\\Sent"]}
    assert parse(b"a STATUS x (SIZE DELETED)").args["items"] == ["SIZE", "DELETED"]


_OPTS = st.sampled_from(["SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE", "CHILDREN", "STATUS",
                         "STATUS (MESSAGES)", "STATUS (SIZE DELETED UNSEEN)", "STATUS ()", "FOO", "(", ")",
                         "", "RETURN", "USE", "\\Sent", "(\\Archive)"])
_PATS = st.sampled_from(['""', '"*"', "%", "INBOX", '"a b"', "(", ")", '("x" "y")', "()", "{3}", "&Jjo",
                         '"Größe"', "~{1}", "*2", '"\\"'])
_TOKENS = st.one_of(_OPTS, _PATS, st.text(alphabet="()\" \\%*~{}RETURNLISTabc12+", max_size=6))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_TOKENS, max_size=10), st.sampled_from(["LIST", "CREATE x", "STATUS x", "LSUB"]),
       st.sampled_from([frozenset(), frozenset({"UTF8=ACCEPT"}), frozenset({"IMAP4REV2"})]))
def test_fuzz_list_create_status_grammar(tokens, verb, enabled):
    """Any arrangement of the new grammar's pieces: a Command or a ParseError, nothing else."""
    line = ("t " + verb + " " + " ".join(tokens)).encode()
    try:
        cmd = parse_command([line], enabled)
    except ParseError as e:
        assert e.tag == "t"
        return
    if cmd.name == "LIST":
        assert len(cmd.args["patterns"]) >= 0 and cmd.args["selection"] <= {
            "SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"}
        if "RECURSIVEMATCH" in cmd.args["selection"]:
            assert cmd.args["selection"] & {"SUBSCRIBED", "SPECIAL-USE"}
        assert ("STATUS" in cmd.args["returns"]) == bool(cmd.args["status_items"])


@settings(max_examples=200, deadline=None)
@given(st.sets(st.sampled_from(["SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"])),
       st.lists(st.sampled_from(["INBOX", "*", "%", "a/%", "Größe*"]), min_size=1, max_size=4),
       st.sets(st.sampled_from(["SUBSCRIBED", "CHILDREN", "SPECIAL-USE"])),
       st.lists(st.sampled_from(["MESSAGES", "SIZE", "DELETED", "UNSEEN", "UIDNEXT"]), max_size=4, unique=True))
def test_fuzz_valid_list_commands_parse_back(selection, patterns, returns, items):
    """A well-formed extended LIST parses to exactly what was written."""
    from mailstack.imap import mutf7
    sel = "(" + " ".join(sorted(selection)) + ") " if selection else ""
    pats = "(" + " ".join('"%s"' % mutf7.encode(p) for p in patterns) + ")"
    ret = sorted(returns) + (["STATUS (" + " ".join(items) + ")"] if items else [])
    line = f'x LIST {sel}"" {pats}' + (" RETURN (" + " ".join(ret) + ")" if ret else "")
    if "RECURSIVEMATCH" in selection and not selection & {"SUBSCRIBED", "SPECIAL-USE"}:
        with pytest.raises(ParseError):
            parse(line.encode())
        return
    a = parse(line.encode()).args
    assert a["selection"] == selection and a["patterns"] == patterns
    assert a["returns"] == returns | ({"STATUS"} if items else set()) and a["status_items"] == items


_NAMES = st.lists(st.sampled_from(["a", "a/b", "a/b/c", "b", "b/x2", "c2", "c2/d", "INBOX", "e/f2"]),
                  unique=True, max_size=8)


@settings(max_examples=200, deadline=None)
@given(_NAMES, _NAMES, _NAMES, st.lists(st.sampled_from(["*", "%", "a/%", "*2", "a", "INBOX", "%/%"]),
                                         min_size=1, max_size=3),
       st.sets(st.sampled_from(["SUBSCRIBED", "RECURSIVEMATCH", "SPECIAL-USE"])),
       st.sets(st.sampled_from(["SUBSCRIBED", "CHILDREN", "SPECIAL-USE"])))
def test_fuzz_selection_rules(real, special, subscribed, patterns, selection, returns):
    """RFC 5258 section 3's rules over random hierarchies, checked one by one."""
    from mailstack.imap.listing import list_pattern, select_mailboxes
    from mailstack.store.base import MailboxInfo
    names = set(real) | {"INBOX"}
    parents = {n.rsplit("/", 1)[0] for n in names if "/" in n}
    boxes = [MailboxInfo(n, "\\Archive" if n in special else None, n in subscribed, False, True) for n in names]
    boxes += [MailboxInfo(p, None, p in subscribed, True, False) for p in parents - names]
    if "RECURSIVEMATCH" in selection and not selection & {"SUBSCRIBED", "SPECIAL-USE"}:
        selection = selection | {"SUBSCRIBED"}
    rxs = [list_pattern(p) for p in patterns]
    out = select_mailboxes(boxes, set(subscribed), rxs, selection, returns)
    listed = [r.name for r in out]
    assert len(listed) == len(set(listed)) and (not listed or listed[0] == "INBOX" or "INBOX" not in listed)

    def meets(n):
        if not selection & {"SUBSCRIBED", "SPECIAL-USE"}:
            return n in names or n in parents
        return ("SUBSCRIBED" not in selection or n in subscribed) and \
            ("SPECIAL-USE" not in selection or (n in special and n in names))
    for r in out:
        assert any(rx.match(r.name) for rx in rxs)  # only names matching a pattern
        assert ("\\NonExistent" in r.attrs) == (r.name not in names)
        assert r.selectable == (r.name in names and meets(r.name))  # who gets a LIST-STATUS
        if not meets(r.name):  # listed only because a descendant meets the criteria
            assert r.childinfo and "RECURSIVEMATCH" in selection
        if "\\Subscribed" in r.attrs:
            assert r.name in subscribed
        if "CHILDREN" not in returns:
            assert not {"\\HasChildren", "\\HasNoChildren"} & set(r.attrs)
    for n in names | parents | set(subscribed):  # nothing that meets the criteria is left out
        if meets(n) and any(rx.match(n) for rx in rxs):
            assert n in listed, n


@settings(max_examples=800, deadline=None)
@given(st.text(alphabet="ab/*%", max_size=9), st.text(alphabet="ab/", max_size=9))
def test_fuzz_pattern_matcher_agrees_with_a_regex(pattern, name):
    """The linear-time LIST matcher answers as the obvious regex does (on short names)."""
    from mailstack.imap.listing import list_pattern
    rx = "".join(".*" if ch == "*" else "[^/]*" if ch == "%" else re.escape(ch) for ch in pattern)
    assert list_pattern(pattern).match(name) == bool(re.fullmatch(rx, name, re.S)), (pattern, name)


def test_pathological_patterns_cost_no_time(alice):
    import time
    from mailstack.imap.listing import list_pattern
    long = "a" * 500
    for pattern in ("*a" * 16 + "*b", "%a" * 16 + "%b", "*a%" * 10 + "b", "*" * 300 + "b"):
        t = time.monotonic()
        assert not list_pattern(pattern).match(long)
        assert time.monotonic() - t < 0.5, pattern  # a backtracking regex takes seconds from 3 stars
    alice.ok(f"CREATE {'a' * 200}")
    t = time.monotonic()
    assert alice.ok('LIST "" ' + "*a" * 16 + "*b") == []
    assert time.monotonic() - t < 5
    lines, status, tagged = alice.cmd('LIST "" ' + "*a" * 40)
    assert status == "BAD" and b"wildcards" in tagged
