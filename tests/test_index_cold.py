"""The cold listing (issue 16, session 4): index lines made in the worker call that parses
the headers, with one reused JSON encoder; the Date: shortcut taken for the 29th to the
31st too.  Each must give what the plain path gives: the same index bytes as json.dumps,
the same dates as the email package, and the same FETCH answer cold (files put in behind
the server's back), warm, and after a restart, over more messages than one FETCH batch."""
from __future__ import annotations

import email.utils
import json

from hypothesis import given, settings, strategies as st

from imap_fixtures import InProcessIMAP
from mailstack.imap import fetch, sort
from mailstack.imap.fetching import read_header
from mailstack.imap.states import FETCH_BATCH
from mailstack.store import index as idxmod, uidlist
from test_index_fast import listing, maildir, place, reference, restart

_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text() |
                     st.floats(allow_nan=False),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=10).filter(lambda k: k not in ("v", "env")), _json, max_size=8),
       st.none() | st.text())
def test_index_line_is_what_json_dumps_gives(value, env):
    if env is not None:  # "v" and "env" lead the line, wherever they were
        value = {**value, "env": env, "v": fetch.CACHE_VERSION}
    line = idxmod._dumps(value)
    if env is not None:
        value = {"v": value["v"], "env": value["env"], **value}
    assert line == json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert json.loads(line) == value


def _slow(value: bytes):
    try:
        return email.utils.parsedate_to_datetime(value.decode("ascii"))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def test_date_shortcut_on_the_last_days_of_a_month_is_the_email_package():
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    for year in (1900, 1996, 2000, 2023, 2024, 2100, 2400):
        for mon in months:
            for day in range(26, 33):
                for zone in ("+0000", "-0000", "+0200", "-0930"):
                    value = f"Tue, {day} {mon} {year} 23:59:07 {zone}".encode()
                    got, want = fetch._date(fetch.Part(0, 0, 0, [(b"date", value)])), _slow(value)
                    if want is None:
                        assert got is None, value
                    else:  # what SENT* and SORT (DATE) take of it ("-0000": naive, read as UTC)
                        assert (fetch._ymd(got), sort.seconds(got)) == (fetch._ymd(want), sort.seconds(want)), value


def _corpus(n: int) -> list[bytes]:
    """Headers of every kind a listing meets: RFC 2047 B and Q words (UTF-8, ISO-8859-1, a
    broken one), raw UTF-8 and raw Latin-1, folding, groups, comments, dates on the last
    days of months and none, bare LF, no blank line, a header longer than the first read."""
    names = ["=?utf-8?b?Wm/DqyDDhW5nc3Ryw7Zt?=", "=?iso-8859-1?q?J=F6rg?=", "Grüße Straße",
             b"Ren\xe9".decode("latin-1"), "=?utf-8?b?broken", '"Doe, John" (work)', ""]
    subjects = ["=?utf-8?b?UXVhcnRlcmx5IHJlcG9ydDog0L7RgtGH0ZHRgg==?=", "Re: =?iso-8859-1?q?caf=E9?=",
                "Fwd: [list] plain", "デート 予定", "line one\r\n\tline two", "", "=?x-unknown?q?abc?="]
    dates = ["Sat, 31 Dec 2022 23:59:59 +0100", "29 Feb 2024 12:00:00 -0000", "Mon, 30 Apr 2025 08:00:00 +0930",
             "Thu, 29 Feb 2023 10:00:00 +0000", "31 Jun 2025 10:00:00 +0000", None, "garbage"]
    out = []
    for i in range(n):
        name, subj, date = names[i % 7], subjects[(i // 7) % 7], dates[(i // 49) % 7]
        h = [f"From: {name} <u{i % 13}@example.org>" if name else f"From: u{i % 13}@example.org",
             "To: Team: a@x.test, (c) b@x.test;" if i % 5 == 0 else "To: Bench User <bench@bench.test>",
             f"Subject: {subj}", f"Message-ID: <{i}@example.org>"]
        if date is not None:
            h.append(f"Date: {date}")
        if i % 11 == 0:
            h.append(f"In-Reply-To: <{i - 1}@example.org>")
            h.append("References: " + " ".join(f"<{k}@example.org>" for k in range(max(0, i - 3), i)))
        if i % 17 == 0:
            h.append("Cc: =?utf-8?q?=C3=89milie?= <e@x.test>, raw <r@x.test>")
        raw = "\r\n".join(h).encode("utf-8") if i % 3 else "\r\n".join(h).encode("utf-8", "replace")
        if name == b"Ren\xe9".decode("latin-1") and i % 2:
            raw = raw.replace("René".encode("utf-8"), b"Ren\xe9")  # 8-bit Latin-1, as it came
        if i % 97 == 0:
            raw += b"\r\nX-Long: " + b"z" * 5000
        if i % 89 == 0:
            raw = raw.replace(b"\r\n", b"\n") + b"\n\nbare LF %d\n" % i
        elif i % 83 == 0:
            raw += b"\r\n"  # no blank line, no body
        else:
            raw += b"\r\n\r\nbody %d\r\n" % i
        out.append(raw)
    return out


def test_cold_listing_over_several_batches_is_the_warm_and_the_restarted_one(tmp_path):
    srv = InProcessIMAP(tmp_path)
    try:
        box = maildir(srv)
        datas = _corpus(2 * FETCH_BATCH + 77)
        place(box, datas)
        want = reference(srv)  # envelopes checked against a full parse of each message
        (box / idxmod.NAME).unlink(missing_ok=True)  # the reference's FETCH wrote entries
        restart(srv)
        assert len(want) == len(datas)
        assert listing(srv) == want  # cold: every entry from the files, lines made in the worker
        assert listing(srv) == want  # warm: from memory
        restart(srv)
        assert listing(srv) == want  # from the index file's lines
        # the lines on disk are the entries a header parse of each file gives
        lines = (box / idxmod.NAME).read_bytes().split(b"\n")
        assert len([x for x in lines[1:] if x]) == len(datas)
        by_base = {p.name.split(":")[0]: p for sub in ("new", "cur") for p in (box / sub).iterdir()}
        uids = {uid: base for base, uid in uidlist.parse((box / uidlist.NAME).read_bytes()).uids.items()}
        for x in lines[1:]:
            if not x:
                continue
            uid, _, js = x.partition(b" ")
            path = by_base[uids[int(uid)]]
            assert json.loads(js) == json.loads(idxmod._dumps(fetch.header_entry(read_header(str(path)))))
    finally:
        srv.close()
