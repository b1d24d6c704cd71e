"""APPEND extensions: MULTIAPPEND (RFC 3502, all or nothing, APPENDUID uid-set), CATENATE
(RFC 4469: URL and TEXT parts, BADURL, TOOBIG), APPENDLIMIT (RFC 7889: capability and
STATUS item), the LITERAL+ / LITERAL- decision (RFC 7888), the bounds (messages per
command, bytes per command, the shared in-memory budget), and the IMAP URL parser (RFC
5092) fuzzed.  Raw commands where exact answers matter, imapclient where it has the call
(multiappend, capabilities, STATUS)."""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from imapclient import IMAPClient

from harness import maildir_path
from imap_fixtures import InProcessIMAP
from mailstack.imap import appending, imapurl
from mailstack.imap.parser import ParseError, Section, parse_command
from test_imap_session import ALICE, PW, Raw, msg

MIB = 1 << 20


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = InProcessIMAP(tmp_path_factory.mktemp("append"))
    yield s
    s.close()


def _uids(tagged: bytes) -> tuple[int, str]:
    m = re.search(rb"\[APPENDUID (\d+) ([\d:,]+)\]", tagged)
    assert m, tagged
    return int(m.group(1)), m.group(2).decode()


def _count(r: Raw, box: str) -> int:
    lines = r.ok(f"STATUS {box} (MESSAGES)")
    return int(re.search(rb"MESSAGES (\d+)", lines[0]).group(1))


# --- APPENDLIMIT and LITERAL+ -------------------------------------------------------------------

def test_appendlimit_capability_and_status_item(srv):
    limit = srv.cfg.smtp.max_message_size
    c = IMAPClient("127.0.0.1", srv.ports["imaps"], ssl_context=_ctx(srv))
    try:
        c.login(ALICE, PW)
        caps = set(c.capabilities())
        assert {b"BINARY", b"MULTIAPPEND", b"CATENATE", b"APPENDLIMIT=%d" % limit, b"LITERAL+"} <= caps
        assert b"LITERAL-" not in caps
        assert c.folder_status("INBOX", ["APPENDLIMIT", "MESSAGES"])[b"APPENDLIMIT"] == limit
    finally:
        c.logout()
    r = Raw(srv)
    r.ok("CREATE Limits")
    assert r.ok("STATUS Limits (APPENDLIMIT)") == [b"* STATUS Limits (APPENDLIMIT %d)" % limit]
    r.close()


def test_literal_plus_accepts_non_synchronising_literals_over_4096(srv):
    """We offer LITERAL+ (not LITERAL-): a {n+} literal of any size up to the APPEND limit is
    taken without a continuation, where a LITERAL- server would have to refuse it."""
    r = Raw(srv)
    big = msg(1) + b"x" * 5000
    r.send(b"a APPEND INBOX {%d+}\r\n%s\r\n" % (len(big), big))
    lines, tagged = r.until(b"a")
    assert not any(x.startswith(b"+") for x in lines) and tagged.startswith(b"a OK [APPENDUID ")
    r.close()


# --- MULTIAPPEND ----------------------------------------------------------------------------------

@pytest.mark.parametrize("store", ["maildir", "memory"])
def test_multiappend_stores_every_message_with_its_flags_and_date(tmp_path, store):
    s = InProcessIMAP(tmp_path, store=store)
    try:
        r = Raw(s)
        r.ok("CREATE Multi")
        a, b, c = msg(1), msg(2), msg(3)
        r.send(b'm APPEND Multi (\\Seen) "01-Feb-2024 10:00:00 +0000" {%d}\r\n' % len(a))
        assert r.line().startswith(b"+ ")
        r.send(a + b' (\\Flagged $Work) {%d}\r\n' % len(b))
        assert r.line().startswith(b"+ ")
        r.send(b + b' {%d+}\r\n%s\r\n' % (len(c), c))
        _, tagged = r.until(b"m")
        uidvalidity, uids = _uids(tagged)
        assert uids == "1:3"
        lines = r.ok("EXAMINE Multi")
        assert b"* 3 EXISTS" in lines and b"[UIDVALIDITY %d]" % uidvalidity in b" ".join(lines)
        lines = r.ok("FETCH 1:3 (FLAGS INTERNALDATE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        text = b"\r\n".join(lines)
        assert re.search(rb"\* 1 FETCH \(FLAGS \(\\Seen \\Recent\) INTERNALDATE \" 1-Feb-2024 10:00:00 \+0000\"", text)
        assert re.search(rb"\* 2 FETCH \(FLAGS \([^)]*\\Flagged[^)]*\)", text) and b"$Work" in text
        assert [int(x) for x in re.findall(rb"Subject: hello (\d)", text)] == [1, 2, 3]
        r.close()
    finally:
        s.close()


def test_imapclient_multiappend(srv):
    c = IMAPClient("127.0.0.1", srv.ports["imaps"], ssl_context=_ctx(srv))
    try:
        c.login(ALICE, PW)
        c.create_folder("ViaClient")
        resp = c.multiappend("ViaClient", [msg(4), {"msg": msg(5), "flags": [b"\\Answered"]}])
        assert resp[0] == "OK" and re.match(rb"\[APPENDUID \d+ 1:2\]", resp[1][0])
        c.select_folder("ViaClient")
        got = c.fetch([1, 2], ["FLAGS", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])
        assert len(got) == 2 and b"\\Answered" in got[2][b"FLAGS"]
    finally:
        c.logout()


def test_a_refused_message_leaves_none_of_the_others(srv):
    r = Raw(srv)
    r.ok("CREATE Atomic")
    _, tagged = r.cmd(b"APPEND Atomic {%d+}\r\n%s {0+}\r\n" % (len(msg(1)), msg(1)))
    assert b" NO " in tagged and _count(r, "Atomic") == 0
    bad_url = b' CATENATE (URL "/INBOX/;UID=999999")'
    _, tagged = r.cmd(b"APPEND Atomic {%d+}\r\n%s%s" % (len(msg(1)), msg(1), bad_url))
    assert b"NO [BADURL /INBOX/;UID=999999]" in tagged and _count(r, "Atomic") == 0
    # the store refuses the third (a 27th keyword has no Maildir letter): nothing stays
    kws = " ".join(f"k{i}" for i in range(27)).encode()
    cmd = b"APPEND Atomic {%d+}\r\n%s {%d+}\r\n%s (%s) {%d+}\r\n%s" % (
        len(msg(1)), msg(1), len(msg(2)), msg(2), kws, len(msg(3)), msg(3))
    _, tagged = r.cmd(cmd)
    assert b" NO " in tagged and _count(r, "Atomic") == 0
    _, tagged = r.cmd(b"APPEND NoSuchBox {%d+}\r\n%s {%d+}\r\n%s" % (len(msg(1)), msg(1), len(msg(2)), msg(2)))
    assert b"NO [TRYCREATE]" in tagged
    r.close()


def test_multiappend_on_a_full_disk_stores_nothing(tmp_path):
    """A real full disk (a tmpfs): the third message does not fit, so none stays, and
    nothing is left in tmp/; once there is room the same command stores all three."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the test command runs as root)")
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(fs)], check=True)
    s = None
    try:
        s = InProcessIMAP(fs)
        r = Raw(s)
        filler = fs / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        os.truncate(filler, filler.stat().st_size - 640 * 1024)  # room for two of the three
        parts = [msg(i) + b"y" * (300 * 1024) for i in range(3)]
        cmd = b"APPEND INBOX" + b"".join(b" {%d+}\r\n%s" % (len(p), p) for p in parts)
        _, tagged = r.cmd(cmd)
        assert b"NO [OVERQUOTA]" in tagged
        assert _count(r, "INBOX") == 0
        inbox = maildir_path(Path(s.cfg.server.data_dir), ALICE)
        assert os.listdir(inbox / "tmp") == [] and os.listdir(inbox / "cur") == []
        filler.unlink()
        _, tagged = r.cmd(cmd)
        assert _uids(tagged)[1] == "1:3" and _count(r, "INBOX") == 3
        r.close()
    finally:
        if s is not None:
            s.close()
        if subprocess.run(["umount", str(fs)]).returncode:
            subprocess.run(["umount", "-l", str(fs)])


def test_default_append_many_undoes_what_it_added():
    """Store.append_many's default (for backends without an atomic one) expunges the
    messages it added when a later one fails."""
    from imap_memstore import MemStore
    from mailstack.events import EventBus
    from mailstack.store.base import StoreFull

    class FillsUp(MemStore):
        async def append(self, account, mailbox, message, *args, **kwargs):
            if b"third" in message:
                raise StoreFull("Not enough disk space")
            return await super().append(account, mailbox, message, *args, **kwargs)

    async def run():
        store = FillsUp(EventBus())
        await store.ensure_account(ALICE)
        with pytest.raises(StoreFull):
            await store.append_many(ALICE, "INBOX", [(b"S: first\r\n\r\n", [], None),
                                                     (b"S: second\r\n\r\n", ["\\Seen"], None),
                                                     (b"S: third\r\n\r\n", [], None)])
        return await store.status(ALICE, "INBOX")
    assert asyncio.run(run())["MESSAGES"] == 0


def test_multiappend_bounds(tmp_path, monkeypatch):
    s = InProcessIMAP(tmp_path, {"max_line_length": 1024})
    try:
        s.cfg.smtp.max_message_size = 100_000
        s.cfg.smtp.max_data_in_flight = 1 * MIB  # one APPEND command: at most 256 KiB
        r = Raw(s)
        monkeypatch.setattr(appending, "MAX_APPEND_MESSAGES", 3)
        four = b"APPEND INBOX" + b"".join(b" {%d+}\r\n%s" % (len(msg(i)), msg(i)) for i in range(4))
        _, tagged = r.cmd(four)
        assert b"NO [LIMIT]" in tagged and _count(r, "INBOX") == 0
        monkeypatch.setattr(appending, "MAX_APPEND_MESSAGES", 1000)
        # each literal may be 100 kB, all of them together 256 KiB: the third is refused
        part = msg(0) + b"z" * 95_000
        r.send(b"b APPEND INBOX {%d}\r\n" % len(part))
        assert r.line().startswith(b"+ ")
        r.send(part + b" {%d}\r\n" % len(part))
        assert r.line().startswith(b"+ ")
        r.send(part + b" {%d}\r\n" % len(part))
        _, tagged = r.until(b"b")
        assert tagged.startswith(b"b NO [TOOBIG]") and _count(r, "INBOX") == 0
        from mailstack.smtp.budget import budget_for
        assert budget_for(s.services).used == 0  # the two accepted literals were given back
        r.close()
    finally:
        s.close()


# --- CATENATE -----------------------------------------------------------------------------------

DRAFT = (b"From: bob@example.org\r\nSubject: draft\r\nMIME-Version: 1.0\r\n"
         b"Content-Type: multipart/mixed; boundary=\"BB\"\r\n\r\n--BB\r\n"
         b"Content-Type: text/plain\r\n\r\nfirst text\r\n--BB\r\n"
         b"Content-Type: application/zip\r\nContent-Transfer-Encoding: base64\r\n\r\nUEsDBA==\r\n--BB--\r\n")


def _catenate_cmd(box: str, parts: list) -> bytes:
    out = b"APPEND " + box.encode() + b" (\\Seen) CATENATE ("
    for i, p in enumerate(parts):
        out += b" " if i else b""
        out += (b"TEXT {%d+}\r\n" % len(p) + p) if isinstance(p, bytes) else b'URL "' + p.encode() + b'"'
    return out + b")"


def test_catenate_replaces_an_attachment_from_urls_and_text(srv):
    """RFC 4469 example 1: the header and the text part come from the stored draft by URL,
    the new attachment as TEXT; the result is byte for byte what the client meant."""
    r = Raw(srv)
    r.ok("CREATE Drafts2")
    _, tagged = r.cmd(b"APPEND Drafts2 {%d+}\r\n%s" % (len(DRAFT), DRAFT))
    v, uid = _uids(tagged)
    base = f"/Drafts2;UIDVALIDITY={v}/;UID={uid}"
    new_part = b"Content-Type: text/x-new\r\n\r\nreplacement\r\n--BB--\r\n"
    _, tagged = r.cmd(_catenate_cmd("Drafts2", [f"{base}/;SECTION=HEADER", b"--BB\r\n",
                                                f"{base}/;section=1.MIME", f"{base}/;Section=1",
                                                b"\r\n--BB\r\n" + new_part]))
    _, new_uid = _uids(tagged)
    r.ok("EXAMINE Drafts2")
    lines = r.ok(f"UID FETCH {new_uid} (FLAGS BODY.PEEK[])")
    head = DRAFT[:DRAFT.index(b"\r\n\r\n") + 4]
    expected = head + b"--BB\r\nContent-Type: text/plain\r\n\r\nfirst text\r\n--BB\r\n" + new_part
    assert b"{%d}\r\n" % len(expected) + expected in b"\r\n".join(lines)
    assert b"\\Seen" in lines[0]
    # a whole message, a part with PARTIAL, from another mailbox while one is selected
    r.ok("SELECT INBOX")
    _, tagged = r.cmd(_catenate_cmd("Drafts2", [f"{base}/;SECTION=1/;PARTIAL=0.5", b"\r\n",
                                                f"/Drafts2/;UID={uid}"]))
    _, third = _uids(tagged)
    r.ok("EXAMINE Drafts2")
    lines = r.ok(f"UID FETCH {third} BODY.PEEK[]")
    assert b"\r\n".join(lines).endswith(b"first\r\n" + DRAFT + b")")
    # relative to the selected mailbox (the base URL of RFC 4469 3 in the selected state)
    r.ok("SELECT Drafts2")
    _, tagged = r.cmd(_catenate_cmd("Drafts2", [f";UID={uid}/;SECTION=1"]))
    _, fourth = _uids(tagged)
    assert b"{10}\r\nfirst text" in b"\r\n".join(r.ok(f"UID FETCH {fourth} BODY.PEEK[]"))
    r.ok("UNSELECT")
    _, tagged = r.cmd(_catenate_cmd("Drafts2", [f";UID={uid}"]))
    assert b"NO [BADURL ;UID=" in tagged and b"no mailbox is selected" in tagged
    r.close()


def test_catenate_refuses_urls_it_cannot_resolve(srv):
    r = Raw(srv)
    r.ok("CREATE Cat")
    _, tagged = r.cmd(b"APPEND Cat {%d+}\r\n%s" % (len(DRAFT), DRAFT))
    v, uid = _uids(tagged)
    for url, why in [
        (f"imap://bob@mail.example.test/INBOX/;UID={uid}", b"relative"),  # another user/server
        (f"/Cat;UIDVALIDITY={v + 1}/;UID={uid}", b"UIDVALIDITY"),
        (f"/Cat/;UID={int(uid) + 50}", b"no such message"),
        (f"/Cat/;UID={uid}/;SECTION=7", b"no such body part"),
        ("/NoSuchBox/;UID=1", b"no such mailbox"),
        ("/Cat/;UID=0", b"bad UID"),
        ("/Cat/;SECTION=1/;UID=1", b"bad URL component"),
        ("/Cat?SUBJECT%20x", b"not a message URL"),
        ("/../Cat/;UID=1", b"no such mailbox"),
    ]:
        _, tagged = r.cmd(_catenate_cmd("Cat", [b"x\r\n", url]))
        assert b"NO [BADURL " + url.encode() + b"]" in tagged and why in tagged, (url, tagged)
    assert _count(r, "Cat") == 1
    r.close()


def test_catenate_result_over_the_limit_is_toobig(tmp_path):
    s = InProcessIMAP(tmp_path)
    try:
        s.cfg.smtp.max_message_size = 4000
        r = Raw(s)
        m = msg(1) + b"q" * 1500
        _, tagged = r.cmd(b"APPEND INBOX {%d+}\r\n%s" % (len(m), m))
        _, uid = _uids(tagged)
        url = f"/INBOX/;UID={uid}"
        _, tagged = r.cmd(_catenate_cmd("INBOX", [url, url]))
        assert _uids(tagged)  # two copies fit
        _, tagged = r.cmd(_catenate_cmd("INBOX", [url, url, url]))
        assert b"NO [TOOBIG]" in tagged and _count(r, "INBOX") == 2
        from mailstack.smtp.budget import budget_for
        assert budget_for(s.services).used == 0
        r.close()
    finally:
        s.close()


def test_catenate_within_multiappend(srv, caplog):
    caplog.set_level("INFO", logger="mailstack.imap")
    r = Raw(srv)
    r.ok("CREATE Both")
    _, tagged = r.cmd(b"APPEND Both {%d+}\r\n%s" % (len(msg(7)), msg(7)))
    _, uid = _uids(tagged)
    plain = msg(8)
    cmd = (b"APPEND Both CATENATE (URL \"/Both/;UID=%s/;SECTION=HEADER\" TEXT {6+}\r\nnew!\r\n)"
           b" (\\Flagged) {%d+}\r\n%s" % (uid.encode(), len(plain), plain))
    _, tagged = r.cmd(cmd)
    _, uids = _uids(tagged)
    assert uids == f"{int(uid) + 1}:{int(uid) + 2}"
    r.ok("EXAMINE Both")
    lines = r.ok(f"UID FETCH {int(uid) + 1} BODY.PEEK[TEXT]")
    assert b"{6}\r\nnew!\r\n" in b"\r\n".join(lines)
    r.close()
    # for the real-client matrix: which extension a session used, once each
    used = [rec.getMessage() for rec in caplog.records if rec.getMessage().endswith(" used")]
    assert sorted(used) == ["IMAP CATENATE used", "IMAP MULTIAPPEND used"]


# --- grammar and the URL parser ---------------------------------------------------------------

def test_append_grammar():
    cmd = parse_command([b'a APPEND INBOX (\\Seen) {1}', b"x", b' "01-Feb-2024 10:00:00 +0000" ~{1}', b"\0",
                         b" CATENATE (TEXT {1}", b"y", b' URL "/INBOX/;UID=1")'])
    ms = cmd.args["messages"]
    assert [(m.flags, m.catenate, m.binary) for m in ms] == [(["\\Seen"], False, False), ([], False, True),
                                                             ([], True, False)]
    assert ms[2].parts == [("text", b"y"), ("url", "/INBOX/;UID=1")]
    assert cmd.args["message"] == b"x" and cmd.args["flags"] == ["\\Seen"]
    for bad in ([b"a APPEND INBOX"], [b"a APPEND INBOX CATENATE ()"], [b"a APPEND INBOX CATENATE (FOO {1}", b"x", b")"],
                [b"a APPEND INBOX {1}", b"x", b" junk"], [b"a APPEND INBOX (\\Recent) {1}", b"x", b""]):
        with pytest.raises(ParseError):
            parse_command(bad)


def test_imap_urls():
    u = imapurl.parse("/Drafts;UIDVALIDITY=385759045/;UID=20/;section=1.MIME/;PARTIAL=5.10")
    assert (u.mailbox, u.uidvalidity, u.uid, u.section, u.partial) == (
        "Drafts", 385759045, 20, Section((1,), "MIME"), (5, 10))
    assert imapurl.parse("/inbox/;UID=3").mailbox == "INBOX"
    assert imapurl.parse("/a%2Fb/c/;UID=3").mailbox == "a/b/c"
    assert imapurl.parse("/Entw%C3%BCrfe/;UID=3").mailbox == "Entwürfe"  # UTF-8
    assert imapurl.parse("/Entw&APw-rfe/;UID=3").mailbox == "Entwürfe"  # modified UTF-7
    assert imapurl.parse("/x/;UID=1/;SECTION=HEADER.FIELDS%20(SUBJECT%20TO)").section == \
        Section((), "HEADER.FIELDS", ("SUBJECT", "TO"))
    assert imapurl.parse("/x/;UID=1/;PARTIAL=7").partial == (7, None)
    u = imapurl.parse(";UID=4/;SECTION=2", selected="Entwürfe/a b")  # relative to the selected mailbox
    assert (u.mailbox, u.uid, u.section) == ("Entwürfe/a b", 4, Section((2,)))
    with pytest.raises(imapurl.URLError):
        imapurl.parse(";UID=4")  # nothing selected
    for bad in ("imap://u@h/INBOX/;UID=1", "//h/INBOX/;UID=1", "/INBOX", "/INBOX/;UID=x", "/INBOX/;UID=4294967296",
                "/INBOX;FOO=1/;UID=1", "/INBOX/;UID=1/;SECTION=1.", "/INBOX/;UID=1/;PARTIAL=1.0", "/;UID=1",
                "/INBOX/;UID=1/;UID=2", "/IN BOX/;UID=1", "/x/;UID=1/;SECTION=%FF"):
        with pytest.raises(imapurl.URLError):
            imapurl.parse(bad)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("/;=.%&-ABINOXSUDTVLPRCEHM0123456789abcz()~ \u00fc")), max_size=80))
def test_fuzz_url_parser_fails_only_with_urlerror(text):
    try:
        u = imapurl.parse(text)
    except imapurl.URLError:
        return
    assert u.uid >= 1 and u.mailbox


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=20).filter(lambda n: "\0" not in n), st.integers(1, 2**32 - 1),
       st.one_of(st.none(), st.integers(1, 2**32 - 1)), st.lists(st.integers(1, 40), max_size=4),
       st.one_of(st.none(), st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 2**32 - 1))))
def test_fuzz_url_round_trip(name, uid, uidvalidity, part, partial):
    from urllib.parse import quote
    url = "/" + quote(name.encode("utf-8"), safe="") + (f";UIDVALIDITY={uidvalidity}" if uidvalidity else "")
    url += f"/;UID={uid}" + (f"/;SECTION={'.'.join(map(str, part))}" if part else "")
    url += f"/;PARTIAL={partial[0]}.{partial[1]}" if partial else ""
    from mailstack.imap import mutf7
    expected = name
    if name.isascii():  # an ASCII name is read as modified UTF-7 ("&" starts a run)
        try:
            expected = mutf7.decode(name.encode())
        except mutf7.MUTF7Error:
            with pytest.raises(imapurl.URLError):
                imapurl.parse(url)
            return
    expected = "INBOX" if expected.upper() == "INBOX" else expected
    u = imapurl.parse(url)
    assert (u.mailbox, u.uid, u.uidvalidity, u.partial) == (expected, uid, uidvalidity, partial)
    assert u.section == (Section(tuple(part)) if part else None)


def _ctx(srv):
    ctx = srv.client_tls()
    ctx.check_hostname = False
    return ctx


def test_big_literal_plus_literals_count_against_the_shared_budget(tmp_path):
    """LITERAL+ literals over 64 KiB are counted in the process-wide budget of message bytes
    in memory like synchronising ones: when it is spent, the command's bytes are skipped and
    it gets NO [LIMIT]; the session goes on and the budget is given back in every case."""
    from mailstack.smtp.budget import budget_for
    s = InProcessIMAP(tmp_path)
    try:
        budget = budget_for(s.services)
        r = Raw(s)
        parts = [msg(i) + b"w" * 150_000 for i in range(2)]
        two = b"APPEND INBOX" + b"".join(b" {%d+}\r\n%s" % (len(p), p) for p in parts)
        budget.used = budget.limit - 200_000  # room for one of the two literals only
        _, tagged = r.cmd(two)
        assert b"NO [LIMIT]" in tagged
        assert budget.used == budget.limit - 200_000
        r.ok("NOOP")
        assert _count(r, "INBOX") == 0
        # refused half-way through: the synchronising literal after it gets no "+"
        budget.used = budget.limit - 100_000
        r.send(b"h APPEND INBOX {%d+}\r\n%s {5}\r\n" % (len(parts[0]), parts[0]))
        _, tagged = r.until(b"h")
        assert tagged.startswith(b"h NO [LIMIT]") and budget.used == budget.limit - 100_000
        budget.used = 0
        _, tagged = r.cmd(two)
        assert _uids(tagged)[1] and budget.used == 0
        # a client gone in the middle of a command gives its share back too
        r.send(b"g APPEND INBOX {%d+}\r\n%s" % (len(parts[0]), parts[0][:1000]))
        from harness import wait_for
        wait_for(lambda: budget.used == len(parts[0]), 10, 0.02, "the literal to be counted")
        r.close()
        wait_for(lambda: budget.used == 0, 10, 0.02, "the budget to be given back")
    finally:
        s.close()


_words = st.sampled_from([b"APPEND", b"INBOX", b"CATENATE", b"(", b")", b"TEXT", b"URL", b'"/INBOX/;UID=1"',
                          b"~{3}", b"~{2+}", b"{3}", b"{70000+}", b"~{70001+}", b"{0+}", b"(\\Seen)", b"\x00",
                          b'"01-Feb-2024 10:00:00 +0000"', b"FETCH", b"1", b"BINARY[1]<0.5>",
                          b"BINARY.SIZE[2]", b"BINARY.PEEK[]", b" "])
_cmds = st.lists(_words, max_size=20).map(lambda ws: b"a " + b" ".join(ws))


@settings(max_examples=300, deadline=None)
@given(st.lists(_cmds, min_size=1, max_size=4), st.lists(st.booleans(), min_size=1, max_size=8),
       st.integers(1, 5000))
def test_fuzz_append_framing_parsing_and_budget_bookkeeping(cmds, grants, chunk):
    """Commands with literal8, CATENATE and big LITERAL+ literals, fed in pieces, with a
    budget that grants or refuses at random: only protocol errors come out, and every
    byte granted is handed over with exactly one Frame/FrameError or still pending."""
    from mailstack.imap.framer import CommandFramer, Frame, FrameError
    granted = []
    answers = iter(grants * 100)

    def reserve(n):
        ok = next(answers)
        if ok:
            granted.append(n)
        return ok
    f = CommandFramer(300, 300, 200_000, 300_000, reserve=reserve)
    stream = b"\r\n".join(cmds) + b"\r\n" + b"x" * 75_000 + b"\r\n"
    for i in range(0, len(stream), chunk * 97):
        f.feed(stream[i:i + chunk * 97])
    handed = 0
    for ev in f.events:
        handed += getattr(ev, "reserved", 0)
        if isinstance(ev, Frame):
            try:
                parse_command(ev.parts)
            except ParseError:
                pass
        else:
            assert not isinstance(ev, FrameError) or ev.reserved >= 0
    assert handed + f._reserved == sum(granted)
    assert f.buffered < 400_000


def test_same_results_as_dovecot(srv):
    """The same MULTIAPPEND and CATENATE commands on Dovecot and here: the same stored
    bytes, APPENDUID uid-sets of the same shape, the same all-or-nothing refusal, and
    BADURL for the same URLs (a part that does not exist excepted: Dovecot appends nothing
    for it, we refuse it as RFC 4469 4.1 lists "invalid body part")."""
    from dovecot_fixture import Dovecot
    from test_imap_binary import _dovecot_raw, _dovecot_user
    dc = Dovecot().start()
    try:
        _dovecot_user(dc)
        answers = []
        for client in (_dovecot_raw(dc), Raw(srv)):
            box = f"Same{len(answers)}"
            got = {}
            client.ok(f"CREATE {box}")
            _, tagged = client.cmd(b"APPEND %s {%d+}\r\n%s (\\Seen) {%d+}\r\n%s" % (
                box.encode(), len(DRAFT), DRAFT, len(msg(1)), msg(1)))
            v, uids = _uids(tagged)
            got["uids"] = uids
            first = uids.split(":")[0]
            base = f"/{box};UIDVALIDITY={v}/;UID={first}"
            _, tagged = client.cmd(_catenate_cmd(box, [f"{base}/;SECTION=HEADER", b"--BB\r\n",
                                                       f"{base}/;SECTION=1.MIME", f"{base}/;SECTION=1",
                                                       b"\r\n--BB--\r\n", f"{base}/;SECTION=2/;PARTIAL=2.3"]))
            _, cat_uid = _uids(tagged)
            _, tagged = client.cmd(b"APPEND %s {3+}\r\nabc {0+}\r\n" % box.encode())
            got["empty refused"] = b" NO " in tagged
            for label, url in (("uidvalidity", f"/{box};UIDVALIDITY={v + 1}/;UID={first}"),
                               ("uid", f"/{box}/;UID=99"), ("mailbox", "/NoSuch/;UID=1"),
                               ("absolute", f"imap://u@127.0.0.1/{box}/;UID={first}")):
                _, tagged = client.cmd(_catenate_cmd(box, [url]))
                got[label] = (tagged.split(b" ")[1], re.findall(rb"\[BADURL ([^\]]*)\]", tagged) == [url.encode()])
            client.ok(f"EXAMINE {box}")
            lines = client.ok(f"UID FETCH {cat_uid} BODY.PEEK[]")
            got["catenated"] = b"\r\n".join(lines).split(b"}\r\n", 1)[1][:-1]
            got["messages"] = re.search(rb"MESSAGES (\d+)", b"".join(client.ok(f"STATUS {box} (MESSAGES)"))).group(1)
            answers.append(got)
            client.close()
        dovecot, ours = answers
        assert dovecot["catenated"].startswith(b"From: bob@example.org")
        assert ours == {**dovecot, "catenated": dovecot["catenated"].replace(b"Same0", b"Same1")}
    finally:
        dc.cleanup()
