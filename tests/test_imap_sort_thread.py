"""SORT and THREAD (RFC 5256, RFC 5957 DISPLAY sort): the pure modules (base subject,
sort order, the REFERENCES and ORDEREDSUBJECT algorithms) with hypothesis; the answers
compared with a real Dovecot holding the same messages; real clients (imaplib,
imapclient, imap_tools); and the metadata index that feeds SORT and THREAD."""
from __future__ import annotations

import imaplib
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imapclient import IMAPClient
from imap_tools import MailBoxUnencrypted, SortCriteria

from imap_compare import ALICE, ALICE_PW, Pair, Raw, normalise
from imap_fixtures import InProcessIMAP
from mailstack.imap import fetch, sort, thread


# --- the messages: replies, missing parents, subject variants, equal dates ---------------------
def m(subject=None, mid=None, date="Mon, 1 Jan 2024 10:00:00 +0000", frm="Al <al@x.org>", to="bob@y.org",
      cc=None, refs=None, irt=None, body="x") -> bytes:
    h = []
    for name, value in (("From", frm), ("To", to), ("Cc", cc), ("Subject", subject), ("Date", date),
                        ("Message-ID", mid), ("References", refs), ("In-Reply-To", irt)):
        if value is not None:
            h.append(f"{name}: {value}")
    return ("\r\n".join(h) + "\r\n\r\n" + body + "\r\n").encode()


def D(day, hh=10, mm=0, tz="+0000"):
    return f"Mon, {day} Jan 2024 {hh:02d}:{mm:02d}:00 {tz}"


CORPUS = [
    m("Hello world", "<a@x>", D(1), frm='"Zed Zulu" <zed@x.org>', cc="carol@c.org", body="a" * 50),
    m("Re: Hello world", "<b@x>", D(2), irt="<a@x>", frm="amy@x.org", to='"Bob B" <bob@y.org>'),
    m("Re: [list] Fwd: Hello world", "<c@x>", D(3), refs="<a@x> <b@x>", frm="Mike <mike@m.org>",
      cc="Dan <dan@d.org>"),
    m("Fwd: Other topic (fwd)", "<d@x>", D(4), refs="<missing@x>", to="zoe@z.org", body="b" * 300),
    m("Re: Other topic", "<e@x>", D(5), refs="<missing@x>", frm="=?utf-8?q?=C3=89mile?= <emile@e.org>"),
    m("[list] Announcement", "<f@x>", D(6), frm="bob@b.org", to="Al <al@a.org>"),
    m("Announcement", "<g@x>", D(6), frm="(Comment Name) cc@c.org"),  # the same date as the one before
    m("Re: Announcement", None, D(7), frm="Ann <ann@a.org>"),  # no Message-ID
    m("[Fwd: Weekly digest]", "<h@x>", D(9), to="undisclosed-recipients:;"),
    m("weekly DIGEST", "<i@x>", D(8)),
    m("Dup", "<a@x>", D(10), body="c" * 20),  # a Message-ID another message has
    m("Undated", "<u@x>", None),  # sorts by its internal date
    m("Re: deep", "<j@x>", D(11), refs="<x1@x> <x2@x> <x3@x>"),  # a chain of missing parents
    m("Re: deep", "<k@x>", D(12), irt="<j@x>"),
    m("", "<l@x>", D(13)),
    m("Re:", "<n@x>", D(14)),
    m("=?utf-8?q?Caf=C3=A9?=", "<o@x>", D(15)),
    m("Re: =?utf-8?q?caf=C3=A9?=", "<p@x>", D(16), irt="<zz@x>"),
    m("Re: Re: Fwd: [a] [b] re: thing", "<q@x>", D(17, tz="-0500")),
    m("thing", "<r@x>", D(18, 3)),
    m("Garbage date", "<s@x>", "not a date at all", frm=None),
    m("Hello world", "<t@x>", D(2), refs="<b@x>"),
    m("[PATCH v2] Fix it", "<v@x>", D(20)),
    m("Re: [PATCH v2] Fix it", "<w@x>", D(21), refs="<v@x>"),
    m("Fw: Fix it", "<y@x>", D(19)),
    m("Loop one", "<L1@x>", D(22), refs="<L2@x>"),
    m("Loop two", "<L2@x>", D(23), refs="<L1@x>"),
    m("Re: Loop one", "<L3@x>", D(24), refs="<L2@x> <L1@x>"),
    m("Trunc", "<T3@x>", D(25), refs="<T1@x> <T2@x>"),
    m("Re: Trunc", "<T4@x>", D(26), refs="<T2@x> <T3@x>"),
    m("Re: Trunc", "<T2@x>", D(25, 5), refs="<T1@x>"),
    m("x", "<names1@x>", D(27), frm='"alice zed" <b@b.org>', to="=?utf-8?q?=C3=A9cole?= <e@e.org>"),
    m("x", "<names2@x>", D(27), frm="ALICE Ant <z@z.org>", to='"" <a@a.org>'),
    m("x", "<names3@x>", D(27), frm="<aaa@z.org>", to="Group: m@m.org, n@n.org;"),
    m("(fwd)", "<fw@x>", D(28)),
    m("[fwd: (fwd)]", "<fw2@x>", D(28)),
    m("[x]", "<bl@x>", D(29)),
    m("[x] [y]", "<bl2@x>", D(29)),
    m("re [blob]: fwd: tail  (FWD)  (fwd)", "<tl@x>", D(29)),
    m("Re:\tfolded\r\n  subject", "<fo@x>", D(29)),
]
# internal dates with ties of their own (ARRIVAL), flags for a searched subset
DATES = [time.mktime((2024, 2, 1, 12, 0, 0, 0, 0, 0)) + (i % 7) * 3600 for i in range(len(CORPUS))]
FLAGS = ["\\Seen" if i % 3 == 0 else "" for i in range(len(CORPUS))]


# --- base subject (RFC 5256 section 2.1) ---------------------------------------------------------
@pytest.mark.parametrize("subject, base, reply", [
    ("Hello", "Hello", False),
    ("Re: Hello", "Hello", True),
    ("RE:   Hello", "Hello", True),
    ("re : Hello", "Hello", True),  # subj-refwd allows WSP before the colon
    ("Fwd: Hello", "Hello", True),
    ("Fw: Hello", "Hello", True),
    ("FWD:Hello", "Hello", True),
    ("Re: [list] Fwd: Hello world", "Hello world", True),
    ("Re[2]: Hello", "Hello", True),  # a blob inside subj-refwd
    ("[list] Re: Hello", "Hello", True),  # blobs before subj-refwd belong to the leader
    ("[list] Announcement", "Announcement", False),  # step 4: a blob alone is no reply
    ("[x]", "[x]", False),  # ... and stays when nothing would remain
    ("[x] [y]", "[y]", False),
    ("Hello (fwd)", "Hello", True),
    ("Hello (FWD) (fwd)  ", "Hello", True),
    ("[Fwd: Weekly digest]", "Weekly digest", True),  # step 6
    ("Re: [fwd: x]", "x", True),
    ("[fwd: (fwd)]", "", True),
    ("Re:", "", True),
    ("Re: Re: Fwd: [a] [b] re: thing", "thing", True),
    ("re [blob]: fwd: tail  (FWD)  (fwd)", "tail", True),
    ("Re:\tfolded\r\n  subject", "folded subject", True),  # step 1
    ("Ref: x", "Ref: x", False),  # "re" must be followed by ":" (or WSP / a blob and ":")
    ("Fwd (fwd)", "Fwd", True),
    ("Réunion:  lundi", "Réunion: lundi", False),
])
def test_base_subject_follows_rfc5256_steps(subject, base, reply):
    assert sort.base_subject(subject) == (base, reply)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="Re:[]Fwd()fw: \t\r\nabcFWDé", max_size=40))
def test_base_subject_fuzz_is_total_trimmed_and_idempotent(subject):
    base, _ = sort.base_subject(subject)
    assert base == base.strip(" ") and "  " not in base and "\t" not in base
    assert sort.base_subject(base)[0] == base  # nothing left to take away


def test_casemap_compares_as_dovecot_does():
    assert sort.casemap("Café") == sort.casemap("CAFÉ") == sort.casemap("cafe\u0301")
    assert sort.casemap("abc") == "ABC"


def test_index_fields_from_the_header():
    hdr = (b"From: =?utf-8?q?=C3=89mile?= <Emile@E.org>\r\nTo: group: a@b.c;\r\n"
           b"Subject: Re: [l] Hello\r\nDate: Mon, 1 Jan 2024 10:00:00 -0500\r\n"
           b"Message-ID: <id1@x> (comment)\r\nReferences: <r1@x>\r\n <r2@x> junk <noat>\r\n"
           b"In-Reply-To: <irt@x>\r\n\r\n")
    hend, _ = fetch.split_header(hdr)
    f = sort.fields(fetch.parse_headers(hdr[:hend]))
    assert f["s"] == "HELLO" and f["rf"] == 1
    assert f["f"] == "EMILE" and f["df"] == sort.casemap("Émile") and f["t"] == "GROUP"
    assert f["d"] == 1704121200  # 15:00 UTC
    assert f["id"] == "id1@x" and f["r"] == ["r1@x", "r2@x"]
    # without References the first In-Reply-To id is the parent; without a Date, None
    f = sort.fields([(b"in-reply-to", b"<p1@x> <p2@x>"), (b"date", b"garbage")])
    assert f["r"] == ["p1@x"] and f["d"] is None and "rf" not in f
    many = b" ".join(b"<%d@x>" % i for i in range(500))
    assert sort.fields([(b"references", many)])["r"] == [f"{i}@x" for i in range(400, 500)]


@pytest.mark.parametrize("message", CORPUS, ids=range(len(CORPUS)))
def test_fields_from_the_indexed_envelope_equal_fields_from_the_header(message):
    root = fetch.parse(message)
    entry = fetch.header_entry(message)
    from_env = sort.fields_from_envelope(entry["env"].encode("latin-1"), entry["refs"].encode("latin-1"))
    assert from_env == sort.fields(root.headers)


_HEADER_TEXT = st.text(alphabet='ab "\\()<>@,;:=?[]\té', max_size=30) | st.sampled_from(
    ["=?utf-8?q?Caf=C3=A9?=", '"x \\"y\\"" <a@b>', "grp: a@b, c@d;", "<a@b> (c)"])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["Subject", "From", "To", "Cc", "Date", "Message-ID", "References",
                                           "In-Reply-To"]), _HEADER_TEXT), max_size=8))
def test_fuzz_fields_from_envelope_agree(headers):
    message = "".join(f"{k}: {v}\r\n" for k, v in headers).encode() + b"\r\nbody\r\n"
    entry = fetch.header_entry(message)
    from_env = sort.fields_from_envelope(entry["env"].encode("latin-1"), entry["refs"].encode("latin-1"))
    assert from_env == sort.fields(fetch.parse(message).headers)


def _light_agrees(message: bytes) -> None:
    entry = fetch.header_entry(message)
    full = sort.fields(fetch.parse(message).headers)
    date, subject = sort.envelope_head(entry["env"].encode("latin-1"))
    assert (sort.subject_key(subject), sort.sent_date(date)) == (full["s"], full["d"])
    assert entry["sl"] == [sort.SORT_VERSION, full["s"], full["d"], full.get("rf", 0)]  # kept by a listing


@pytest.mark.parametrize("message", CORPUS, ids=range(len(CORPUS)))
def test_light_keys_from_the_envelope_equal_the_full_fields(message):
    _light_agrees(message)
    # a literal (8-bit text), an escaped quote
    _light_agrees(b'Subject: Re: \xc3\xa9t\xc3\xa9\r\nDate: Tue, 2 Jan 2024 01:00:00 +0100\r\n\r\nx')
    _light_agrees(b'Subject: a "quoted\\" \\ subject\r\n\r\nx')
    assert sort.envelope_head(b"NIL") is None and sort.envelope_head(b"(garbage") is None


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["Subject", "Date", "From"]), _HEADER_TEXT), max_size=5))
def test_fuzz_light_keys_agree(headers):
    _light_agrees("".join(f"{k}: {v}\r\n" for k, v in headers).encode() + b"\r\nbody\r\n")


def _thread_agrees(message: bytes) -> None:
    entry = fetch.header_entry(message)
    env, refs = entry["env"].encode("latin-1"), entry["refs"].encode("latin-1")
    full = sort.fields_from_envelope(env, refs)
    got = sort.thread_fields_from_envelope(env, refs)
    with_light = sort.thread_fields_from_envelope(env, refs, entry["sl"])  # the listing's keys
    assert with_light == got
    if got is None:  # only an envelope with a literal is left to the whole parse
        assert b"}\r\n" in env
        return
    assert got == {k: full[k] for k in sort.THREAD_KEYS if k in full}


@pytest.mark.parametrize("message", CORPUS, ids=range(len(CORPUS)))
def test_thread_fields_from_the_envelope_ends_equal_the_full_fields(message):
    _thread_agrees(message)
    _thread_agrees(b'Message-ID: <a\\"b\\\\@x>\r\nIn-Reply-To: "q\\"" <p@x>\r\nSubject: Re: s\r\n\r\nx')
    _thread_agrees(b"Message-ID: <\xc3\xa9@x>\r\n\r\nx")  # 8-bit: a literal
    assert sort.envelope_tail(b'(NIL "a" "b)') is None and sort.envelope_tail(b"(x y)") is None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["Subject", "Date", "Message-ID", "In-Reply-To", "References"]),
                          _HEADER_TEXT), max_size=6))
def test_fuzz_thread_fields_agree(headers):
    _thread_agrees("".join(f"{k}: {v}\r\n" for k, v in headers).encode() + b"\r\nbody\r\n")


_CRITERIA = st.lists(st.tuples(st.sampled_from(sort.SORT_KEYS), st.booleans()), min_size=1, max_size=4,
                     unique_by=lambda c: c[0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["", "A", "B", "é"]), st.sampled_from([None, 1, 2]),
                          st.integers(0, 3), st.sampled_from([1.0, 2.0]), st.sampled_from(["", "X", "Y"])),
                max_size=12), _CRITERIA)
def test_fuzz_order_uids_equals_order(specs, criteria):
    """The key-column sort (what SORT runs) gives exactly what the item sort gives."""
    items, keys = [], sort.Keys()
    for i, (subj, d, size, idate, addr) in enumerate(specs, 1):
        f = {"s": subj, "d": d, "f": addr, "t": addr[::-1], "c": addr, "df": subj, "dt": addr}
        uid = 10 * i  # UIDs are not sequence numbers
        items.append(sort.Item(uid, i, size, idate, f))
        keys.add_full(uid, f)
    uids = [it.n for it in items]
    sizes = {it.n: it.size for it in items}
    dates = {it.n: it.internaldate for it in items}
    assert sort.order_uids(uids, criteria, keys, sizes, dates) == [it.n for it in sort.order(items, criteria)]


def _item(n, seq=None, size=0, idate=0.0, **f):
    return sort.Item(n, seq or n, size, idate, f)


def test_order_multi_key_reverse_and_ties_by_mailbox_order():
    items = [_item(1, s="B", d=5, size=10), _item(2, s="A", d=5, size=30), _item(3, s="B", d=1, size=20),
             _item(4, s="A", d=5, size=10), _item(5, s="", d=None, idate=3.0, size=10)]
    n = lambda crit: [it.n for it in sort.order(items, crit)]  # noqa: E731
    assert n([("SUBJECT", False)]) == [5, 2, 4, 1, 3]
    assert n([("SUBJECT", True)]) == [1, 3, 2, 4, 5]  # equal keys stay in mailbox order
    assert n([("SUBJECT", False), ("DATE", True)]) == [5, 2, 4, 1, 3]
    assert n([("DATE", False)]) == [3, 5, 1, 2, 4]  # no Date: the internal date (3)
    assert n([("SIZE", True), ("SUBJECT", False)]) == [2, 3, 5, 4, 1]


# --- THREAD, pure ---------------------------------------------------------------------------------
def _thread(alg, specs):
    """specs: (id, refs, subject, date[, reply]) per message, numbered from 1."""
    items = []
    for i, spec in enumerate(specs, 1):
        mid, refs, subject, date = spec[:4]
        f = {"s": subject, "d": date, "r": refs}
        if mid:
            f["id"] = mid
        if len(spec) > 4 and spec[4]:
            f["rf"] = 1
        items.append(_item(i, **f))
    return thread.render(thread.thread(alg, items)).decode()


def test_references_links_prunes_and_merges_subjects():
    # a reply chain, a message whose parent is missing, two children of one missing parent
    assert _thread("REFERENCES", [("a", [], "s", 1), ("b", ["a"], "s", 2, True), ("c", ["a", "b"], "s", 3, True)]) \
        == "(1 2 3)"
    assert _thread("REFERENCES", [("a", ["gone"], "one", 1)]) == "(1)"  # a dummy with one child goes
    assert _thread("REFERENCES", [("a", ["gone"], "p", 1), ("b", ["gone"], "q", 2)]) == "((1)(2))"
    # the message's own last reference wins over a link an earlier header made (1B)
    assert _thread("REFERENCES", [("c", ["a", "b"], "x", 1), ("b", ["z"], "y", 2)]) == "(2 1)"
    # loops are not made; every message still appears once
    out = _thread("REFERENCES", [("a", ["b"], "u", 1), ("b", ["a"], "v", 2)])
    assert sorted(map(int, re.findall(r"\d+", out))) == [1, 2]
    # same subject, no references: a reply goes under the original; two originals under a dummy
    assert _thread("REFERENCES", [("a", [], "s", 1), ("b", [], "s", 2, True)]) == "(1 2)"
    assert _thread("REFERENCES", [("a", [], "s", 1), ("b", [], "s", 2)]) == "((1)(2))"
    assert _thread("REFERENCES", [("a", [], "", 1), ("b", [], "", 2)]) == "(1)(2)"  # empty subjects stay apart


def test_ordered_subject_groups_by_base_subject_and_sorts_by_date():
    out = _thread("ORDEREDSUBJECT", [("a", [], "b", 3), ("b", [], "a", 2), ("c", [], "b", 1), ("d", [], "a", 5),
                                     ("e", [], "b", 4)])
    assert out == "(3 (1)(5))(2 4)"


def _parse_threads(text: str) -> list:
    """Parse the rendered thread-lists strictly by the RFC 5256 grammar: nested lists of ints."""
    pos = 0

    def thread_list():
        nonlocal pos
        assert text[pos] == "(", text
        pos += 1
        out = []
        while text[pos].isdigit():
            m = re.match(r"\d+", text[pos:])
            out.append(int(m.group()))
            pos += m.end()
            if text[pos] == " ":
                pos += 1
                assert text[pos] in "0123456789(", text
        nested = []
        while text[pos] == "(":
            nested.append(thread_list())
        assert out or len(nested) >= 2, text  # thread-nested = 2*thread-list
        assert not nested or len(nested) >= 2, text
        assert text[pos] == ")", text
        pos += 1
        return out + nested

    roots = []
    while pos < len(text):
        roots.append(thread_list())
    return roots


def _flatten(x):
    for y in x:
        if isinstance(y, list):
            yield from _flatten(y)
        else:
            yield y


_IDS = st.sampled_from([f"m{i}" for i in range(12)])
_MSG = st.tuples(st.one_of(st.none(), _IDS), st.lists(_IDS, max_size=5), st.sampled_from(["", "a", "b", "c"]),
                 st.integers(0, 4), st.booleans())


@settings(max_examples=150, deadline=None)
@given(st.lists(_MSG, max_size=25), st.sampled_from(thread.ALGORITHMS))
def test_thread_fuzz_every_message_once_and_valid_grammar(specs, alg):
    out = _thread(alg, specs)
    numbers = list(_flatten(_parse_threads(out)))
    assert sorted(numbers) == list(range(1, len(specs) + 1)), out


def test_thread_deep_chain_needs_no_recursion():
    n = 5000
    specs = [(f"m{i}", [f"m{i - 1}"] if i else [], "s", i) for i in range(n)]
    out = _thread("REFERENCES", specs)
    assert out == "(" + " ".join(str(i) for i in range(1, n + 1)) + ")"
    # each message with the whole chain in References (as mail clients write it; 100 kept)
    ids = [f"m{i}" for i in range(2000)]
    full = [(ids[i], ids[max(0, i - 100):i], "s", i) for i in range(2000)]
    assert _thread("REFERENCES", full) == "(" + " ".join(str(i) for i in range(1, 2001)) + ")"
    branchy = [(f"m{i}", [f"m{(i - 1) // 2}"] if i else [], "s", i) for i in range(n)]  # a binary tree
    assert sorted(_flatten(_parse_threads(_thread("REFERENCES", branchy)))) == list(range(1, n + 1))


# --- against Dovecot ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    p = Pair(tmp_path_factory.mktemp("pair"))
    p.load(CORPUS, DATES, FLAGS)
    ours, theirs = p.clients()
    for r in (ours, theirs):
        r.cmd("SELECT INBOX")
    p.sessions = (ours, theirs)
    yield p
    p.close()


SORTS = ["(SUBJECT)", "(REVERSE SUBJECT)", "(DATE)", "(REVERSE DATE)", "(ARRIVAL)", "(REVERSE ARRIVAL)",
         "(FROM)", "(TO)", "(CC)", "(SIZE)", "(REVERSE SIZE)", "(DISPLAYFROM)", "(DISPLAYTO)",
         "(REVERSE DISPLAYFROM)", "(SUBJECT REVERSE DATE)", "(FROM SUBJECT SIZE)", "(CC REVERSE ARRIVAL)"]


@pytest.mark.parametrize("command", [f"{uid}SORT {keys} UTF-8 {search}"
                                     for keys in SORTS for uid, search in (("", "ALL"), ("UID ", "UNSEEN"))] + [
    "SORT (SUBJECT) US-ASCII SUBJECT hello",
    "SORT (DATE) UTF-8 SUBJECT nothing-has-this",
    "THREAD ORDEREDSUBJECT UTF-8 ALL", "UID THREAD ORDEREDSUBJECT UTF-8 ALL",
    "THREAD REFERENCES UTF-8 ALL", "UID THREAD REFERENCES UTF-8 ALL",
    "THREAD REFERENCES UTF-8 UNSEEN", "THREAD ORDEREDSUBJECT UTF-8 SEEN",
    "THREAD REFERENCES UTF-8 SUBJECT nothing-has-this",
    "SORT RETURN (MIN MAX ALL COUNT) (SUBJECT) UTF-8 ALL", "UID SORT RETURN (ALL) (REVERSE ARRIVAL) UTF-8 ALL",
    "SORT RETURN () (DATE) UTF-8 UNSEEN", "SORT RETURN (COUNT) (DATE) UTF-8 SUBJECT nothing-has-this",
    "SORT RETURN (PARTIAL 2:4) (SUBJECT) UTF-8 ALL",
    "SORT (FOO) UTF-8 ALL", "THREAD FOO UTF-8 ALL", "SORT (SUBJECT) ALL", "THREAD REFERENCES ALL", "SORT (REVERSE) UTF-8 ALL", "SORT () UTF-8 ALL",
])
def test_same_answer_as_dovecot(pair, command):
    ours, theirs = pair.sessions
    assert normalise(ours.cmd(command)) == normalise(theirs.cmd(command))


def test_imapclient_sort_and_thread_as_dovecot(pair):
    answers = []
    for port, user, pw in ((pair.ours.ports["imap"], ALICE, ALICE_PW), (pair.dovecot.imap_port, "u@example.test", "pw")):
        with IMAPClient("127.0.0.1", port, ssl=False) as c:
            c.login(user, pw)
            c.select_folder("INBOX", readonly=True)
            answers.append((c.sort(["SUBJECT", "REVERSE DATE"]), c.sort("ARRIVAL", ["UNSEEN"]),
                            c.thread("REFERENCES"), c.thread("ORDEREDSUBJECT", ["SEEN"])))
    assert answers[0] == answers[1]
    assert len(answers[0][0]) == len(CORPUS)


def test_imap_tools_sorted_search_and_fetch(pair):
    with MailBoxUnencrypted("127.0.0.1", pair.ours.ports["imap"]).login(ALICE, ALICE_PW) as mb:
        uids = mb.uids(sort=SortCriteria.DATE_DESC)
        fetched = [msg.uid for msg in mb.fetch(sort=[SortCriteria.SUBJECT_ASC, SortCriteria.DATE_ASC], mark_seen=False, headers_only=True)]
    theirs = imaplib.IMAP4("127.0.0.1", pair.dovecot.imap_port)
    theirs.login("u@example.test", "pw")
    theirs.select("INBOX", readonly=True)
    try:
        assert uids == theirs.uid("SORT", "(REVERSE DATE)", "UTF-8", "ALL")[1][0].decode().split()
        assert fetched == theirs.uid("SORT", "(SUBJECT DATE)", "UTF-8", "ALL")[1][0].decode().split()
    finally:
        theirs.logout()
    assert len(uids) == len(fetched) == len(CORPUS)


# --- the metadata index --------------------------------------------------------------------------------
@pytest.fixture(params=["maildir", "memory"])
def srv(request, tmp_path):
    s = InProcessIMAP(tmp_path, store=request.param, imap_overrides={"allow_plaintext_auth": True})
    yield s
    s.close()


def _entries(srv, uids):
    async def get():
        mbox = await srv.services.store.open(ALICE, "INBOX", read_only=True)
        try:
            return {u: await mbox.cache_get(u) for u in uids}
        finally:
            await mbox.close()
    return srv.call(get())


def _forget_keys(srv):
    async def forget():
        mbox = await srv.services.store.open(ALICE, "INBOX", read_only=True)
        try:
            mbox.derived().clear()
        finally:
            await mbox.close()
    srv.call(forget())


def _put(srv, entries):
    async def put():
        mbox = await srv.services.store.open(ALICE, "INBOX")
        try:
            await mbox.cache_put(entries)
        finally:
            await mbox.close()
    srv.call(put())


def test_sort_and_thread_come_from_the_index(srv, caplog):
    caplog.set_level("INFO", logger="mailstack.imap")
    for subject, mid, refs in (("b", "<1@x>", None), ("Re: b", "<2@x>", "<1@x>"), ("a", "<3@x>", None)):
        srv.deliver(ALICE, m(subject, mid, refs=refs))
    r = Raw(srv.ports["imap"], ALICE, ALICE_PW)
    try:
        r.cmd("SELECT INBOX")
        if srv.store_kind == "maildir":
            # written just after delivery, from the bytes in hand (store/derived.py's batch)
            srv.call(srv.services.store.group_writer.settled())
            assert all(sort.valid(e) for e in _entries(srv, [1, 2, 3]).values())
        assert r.cmd("SORT (SUBJECT) UTF-8 ALL")[0] == [b"* SORT 3 1 2"]
        assert r.cmd("THREAD REFERENCES UTF-8 ALL")[0] == [b"* THREAD (1 2)(3)"]
        # an entry without the sort fields (written before they existed) is completed when
        # first needed, and kept (the keys in memory forgotten, as after a restart)
        old = _entries(srv, [1])[1]
        _put(srv, {1: {k: v for k, v in old.items() if k != "sort"}})
        assert not sort.valid(_entries(srv, [1])[1])
        _forget_keys(srv)
        # SUBJECT alone comes from the envelope's first items: nothing to write back
        assert r.cmd("UID SORT (REVERSE SUBJECT) UTF-8 ALL")[0] == [b"* SORT 1 2 3"]
        if "env" in old:
            assert not sort.valid(_entries(srv, [1])[1])
        assert r.cmd("UID SORT (REVERSE SUBJECT FROM) UTF-8 ALL")[0] == [b"* SORT 1 2 3"]
        assert sort.valid(_entries(srv, [1])[1])
        if srv.store_kind == "maildir":
            # the answer is the index's: a file changed behind the server's back (Maildir files
            # never change) is not read again
            path = srv.call(_path(srv, 3))
            data = open(path, "rb").read().replace(b"Subject: a", b"Subject: z")
            open(path, "wb").write(data)
            assert r.cmd("SORT (SUBJECT) UTF-8 ALL")[0] == [b"* SORT 3 1 2"]
    finally:
        r.close()
    # the real-client matrix's log line: once per session and extension
    used = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("IMAP uses ")]
    assert sorted(used) == ["IMAP uses SORT", "IMAP uses THREAD=REFERENCES"]


async def _path(srv, uid):
    mbox = await srv.services.store.open(ALICE, "INBOX", read_only=True)
    try:
        return mbox.path(uid)
    finally:
        await mbox.close()


def test_first_sort_after_a_listing_reads_no_file(tmp_path):
    """Files dropped into the Maildir by another program have no index entry; the first
    listing indexes their envelopes, and SORT / THREAD work from that alone."""
    srv = InProcessIMAP(tmp_path, imap_overrides={"allow_plaintext_auth": True})
    r = None
    try:
        new = srv.services.store.account_dir(ALICE) / "new"
        specs = [("b", "<1@x>", None), ("Re: b", "<2@x>", "<1@x>"), ("a", "<3@x>", None)]
        for i, (subject, mid, refs) in enumerate(specs):
            (new / f"{1700000000 + i}.M{i}P1.test").write_bytes(m(subject, mid, D(i + 1), refs=refs))
        r = Raw(srv.ports["imap"], ALICE, ALICE_PW)
        r.cmd("SELECT INBOX")
        assert len(r.cmd("FETCH 1:* (UID ENVELOPE)")[0]) == 3
        for uid in (1, 2, 3):  # changed behind the server's back: must not be read again
            path = srv.call(_path(srv, uid))
            open(path, "wb").write(m("zzz", "<other@x>"))
        assert r.cmd("SORT (SUBJECT) UTF-8 ALL")[0] == [b"* SORT 3 1 2"]
        assert r.cmd("THREAD REFERENCES UTF-8 ALL")[0] == [b"* THREAD (1 2)(3)"]
        # SUBJECT and THREAD read the envelope's first and last items and keep what they
        # found in memory; a sort on addresses parses it whole and writes the fields back
        assert not any(sort.valid(e) for e in _entries(srv, [1, 2, 3]).values())
        assert r.cmd("SORT (FROM SUBJECT) UTF-8 ALL")[0] == [b"* SORT 3 1 2"]
        assert all(sort.valid(e) for e in _entries(srv, [1, 2, 3]).values())
    finally:
        if r:
            r.close()
        srv.close()


def _keys(srv):
    async def get():
        mbox = await srv.services.store.open(ALICE, "INBOX", read_only=True)
        try:
            keys = mbox.derived().get("sort")
            return None if keys is None else (dict(keys.subject), dict(keys.date))
        finally:
            await mbox.close()
    return srv.call(get())


def test_a_first_listing_keeps_the_subject_and_date_keys_for_the_first_sort(tmp_path):
    """The envelopes a cold listing indexes give their SUBJECT keys and sent dates to the
    mailbox's in-memory keys at once (the same values the entries' "sl" hold): the first
    SORT looks at no entry, and answers as SORT from the entries does."""
    srv = InProcessIMAP(tmp_path, imap_overrides={"allow_plaintext_auth": True})
    r = None
    try:
        new = srv.services.store.account_dir(ALICE) / "new"
        for i, message in enumerate(CORPUS):
            (new / f"{1700000000 + i}.M{i}P1.test").write_bytes(message)
        r = Raw(srv.ports["imap"], ALICE, ALICE_PW)
        r.cmd("SELECT INBOX")
        assert _keys(srv) is None
        assert sum(b" FETCH " in x for x in r.cmd("FETCH 1:* (UID FLAGS ENVELOPE)")[0]) == len(CORPUS)
        subject, date = _keys(srv)
        uids = list(range(1, len(CORPUS) + 1))
        lights = {u: e["sl"] for u, e in _entries(srv, uids).items()}
        assert subject == {u: light[1] for u, light in lights.items()}
        assert date == {u: light[2] for u, light in lights.items()}
        commands = ["UID SORT (SUBJECT) UTF-8 ALL", "SORT (REVERSE DATE SUBJECT) UTF-8 ALL",
                    "SORT (SUBJECT REVERSE ARRIVAL) UTF-8 ALL"]
        kept = [r.cmd(c)[0] for c in commands]
        _forget_keys(srv)  # from the entries instead
        assert [r.cmd(c)[0] for c in commands] == kept
    finally:
        if r:
            r.close()
        srv.close()


def test_sort_thread_errors_and_state(srv):
    r = Raw(srv.ports["imap"], ALICE, ALICE_PW)
    try:
        assert r.cmd("SORT (SUBJECT) UTF-8 ALL")[1].startswith(b"BAD")  # nothing selected
        assert r.cmd("UID THREAD REFERENCES UTF-8 ALL")[1].startswith(b"BAD")
        r.cmd("SELECT INBOX")
        assert r.cmd("SORT (SUBJECT) KOI8-R ALL")[1].startswith(b"NO [BADCHARSET")
        assert r.cmd("SORT SUBJECT UTF-8 ALL")[1].startswith(b"BAD")
        assert r.cmd("THREAD REFERENCES UTF-8")[1].startswith(b"BAD")
        assert r.cmd("SORT (SUBJECT) UTF-8 ALL") == ([b"* SORT"], b"OK SORT completed")
        assert r.cmd("THREAD ORDEREDSUBJECT UTF-8 ALL") == ([b"* THREAD"], b"OK THREAD completed")
        caps = r.cmd("CAPABILITY")[0][0].split()
        for cap in (b"SORT", b"SORT=DISPLAY", b"THREAD=ORDEREDSUBJECT", b"THREAD=REFERENCES", b"ESORT"):
            assert cap in caps
    finally:
        r.close()


# --- the grammar: pure, fuzzed ----------------------------------------------------------------------
def test_parse_sort_thread_and_search_return():
    from mailstack.imap.parser import SearchResult, parse_command
    cmd = parse_command([b"a UID SORT RETURN (MIN COUNT) (REVERSE DATE SUBJECT) utf-8 UNSEEN SUBJECT x"])
    assert (cmd.name, cmd.uid, cmd.args["criteria"], cmd.args["return"], cmd.args["charset"]) == \
        ("SORT", True, [("DATE", True), ("SUBJECT", False)], ["MIN", "COUNT"], "utf-8")
    cmd = parse_command([b"a THREAD references US-ASCII ALL"])
    assert cmd.args["algorithm"] == "REFERENCES" and cmd.args["key"] == ("ALL",)
    cmd = parse_command([b"a SEARCH RETURN () $ OLDER 5"])
    assert cmd.args["return"] == ["ALL"] and isinstance(cmd.args["key"][1][0][1], SearchResult)
    assert cmd.args["key"][1][1] == ("OLDER", 5)
    cmd = parse_command([b"a SEARCH RETURN (PARTIAL -1:-50 SAVE) CHARSET UTF-8 ALL"])
    assert cmd.args["partial"] == (-1, -50) and cmd.args["return"] == ["SAVE", "PARTIAL"]
    assert isinstance(parse_command([b"a UID EXPUNGE $"]).args["set"], SearchResult)
    assert isinstance(parse_command([b"a MOVE $ Trash"]).args["set"], SearchResult)


_WORDS = st.sampled_from(["SORT", "UID", "THREAD", "SEARCH", "RETURN", "(", ")", "()", "REVERSE", "SUBJECT",
                          "DATE", "ARRIVAL", "DISPLAYFROM", "UTF-8", "ALL", "$", "1:*", "MIN", "MAX", "SAVE",
                          "PARTIAL", "1:5", "-1:-3", "COUNT", "REFERENCES", "ORDEREDSUBJECT", "OLDER", "5",
                          "YOUNGER", "CHARSET", "\"x\"", "NOT", "OR", " ", "*"])


@settings(max_examples=200, deadline=None)
@given(st.lists(_WORDS, min_size=1, max_size=12), st.sampled_from(["SORT", "THREAD", "SEARCH", "UID SORT"]))
def test_fuzz_grammar_raises_only_parse_errors(words, verb):
    from mailstack.imap.parser import ParseError, parse_command
    try:
        parse_command([f"t {verb} {' '.join(words)}".encode()])
    except ParseError:
        pass


def test_keys_and_threads_kept_in_memory_follow_new_and_expunged_messages(srv):
    """The keys and THREAD answers kept per mailbox for every session: a second session gets
    the same answers, and a delivery or an expunge is seen at once (not a stale answer)."""
    for subject, mid, refs in (("b", "<1@x>", None), ("Re: b", "<2@x>", "<1@x>"), ("a", "<3@x>", None)):
        srv.deliver(ALICE, m(subject, mid, refs=refs))
    one, two = Raw(srv.ports["imap"], ALICE, ALICE_PW), Raw(srv.ports["imap"], ALICE, ALICE_PW)
    try:
        one.cmd("SELECT INBOX")
        two.cmd("SELECT INBOX")
        for r in (one, two, one):
            assert r.cmd("UID THREAD REFERENCES UTF-8 ALL")[0] == [b"* THREAD (1 2)(3)"]
            assert r.cmd("SORT (SUBJECT) UTF-8 ALL")[0] == [b"* SORT 3 1 2"]
        srv.deliver(ALICE, m("Re: a", "<4@x>", refs="<3@x>"))
        one.cmd("NOOP")
        assert one.cmd("UID THREAD REFERENCES UTF-8 ALL")[0] == [b"* THREAD (1 2)(3 4)"]
        assert one.cmd("THREAD REFERENCES UTF-8 ALL")[0] == [b"* THREAD (1 2)(3 4)"]
        assert one.cmd("SORT (SUBJECT) UTF-8 ALL")[0] == [b"* SORT 3 4 1 2"]
        one.cmd("STORE 1 +FLAGS.SILENT (\\Deleted)")
        one.cmd("EXPUNGE")
        # sequence numbers moved down by one; the thread of "b" keeps its reply
        assert one.cmd("THREAD REFERENCES UTF-8 ALL")[0] == [b"* THREAD (1)(2 3)"]
        assert one.cmd("UID THREAD REFERENCES UTF-8 ALL")[0] == [b"* THREAD (2)(3 4)"]
        assert one.cmd("SORT (SUBJECT) UTF-8 ALL")[0] == [b"* SORT 2 3 1"]
        assert one.cmd("UID SORT (SUBJECT) UTF-8 UNDELETED")[0] == [b"* SORT 3 4 2"]
        two.cmd("NOOP")
        assert two.cmd("UID THREAD REFERENCES UTF-8 ALL")[0] == [b"* THREAD (2)(3 4)"]
        assert two.cmd("UID SORT (REVERSE SUBJECT) UTF-8 ALL")[0] == [b"* SORT 2 3 4"]
    finally:
        one.close()
        two.close()


def test_kept_keys_survive_the_last_session(srv):
    """The keys and answers kept for the mailbox outlive its last session: the next session
    gets the same answers (and a delivery meanwhile is sorted in)."""
    for subject in ("b", "a", "c"):
        srv.deliver(ALICE, m(subject, None, None))  # no Date: sorted by the internal date
    r = Raw(srv.ports["imap"], ALICE, ALICE_PW)
    try:
        r.cmd("SELECT INBOX")
        assert r.cmd("SORT (ARRIVAL) UTF-8 ALL")[0] == [b"* SORT 1 2 3"]
        assert r.cmd("SORT (DATE) UTF-8 ALL")[0] == [b"* SORT 1 2 3"]
        assert r.cmd("THREAD ORDEREDSUBJECT UTF-8 ALL")[0] == [b"* THREAD (1)(2)(3)"]
        assert r.cmd("SORT (SUBJECT) UTF-8 ALL")[0] == [b"* SORT 2 1 3"]
        r.cmd("LOGOUT")
    finally:
        r.close()
    srv.deliver(ALICE, m("0", None, None))
    r = Raw(srv.ports["imap"], ALICE, ALICE_PW)
    try:
        r.cmd("SELECT INBOX")
        assert r.cmd("SORT (SUBJECT) UTF-8 ALL")[0] == [b"* SORT 4 2 1 3"]
        assert r.cmd("THREAD ORDEREDSUBJECT UTF-8 ALL")[0] == [b"* THREAD (1)(2)(3)(4)"]
    finally:
        r.close()


def test_keys_forget_expunged_messages():
    keys = sort.Keys()
    for uid in range(1, 6):
        keys.add_full(uid, {"s": str(uid), "d": uid})
        keys.thread[uid] = {"s": str(uid)}
    keys.keep({2, 4})
    assert set(keys.full) == set(keys.subject) == set(keys.date) == set(keys.thread) == {2, 4}
