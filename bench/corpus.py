"""A deterministic corpus of real-world-like messages for the IMAP and POP3 workloads.

Half are plain text, a quarter multipart/alternative (text + HTML), a quarter
multipart/mixed with a base64 attachment; headers carry RFC 2047 encoded non-ASCII
names and subjects (German, Japanese, Russian). About 10% of subjects contain
HEADER_WORD and about 2% of text bodies contain BODY_WORD, so both searches have
hits to find. Lines end in CRLF (as mailstack stores what it receives); files are named
the Dovecot way (",S=<size>,W=<size>") which both servers read without a stat().

The files are written once into a corpus directory and hard-linked into each server's
Maildir new/, so both servers read the very same bytes.
"""
from __future__ import annotations

import base64
import os
import random
from email.header import Header
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone
from pathlib import Path

HEADER_WORD = "Quarterly"
BODY_WORD = "zebracrossing"
NAMES = ["Jürgen Müller", "Zoë Ångström", "山田 太郎", "Дмитрий Иванов", "Alice Example", "Bob Builder",
         "Chloé Dubois", "Ørjan Nilsen", "María José", "Charlie Root"]
SUBJECTS = ["Re: Treffen am Dienstag – Überblick", "会議の議事録", "Отчёт за неделю", "Lunch on Friday?",
            "Fwd: invoice #{n}", "Build failed on main", "Photos from the trip", "Re: Re: budget {n}",
            "Your order {n} has shipped", "Weekly digest"]
WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore "
         "et dolore magna aliqua grüße straße café naïve résumé тест データ").split()


def _encoded(text: str) -> str:
    return Header(text, "utf-8").encode() if not text.isascii() else text


def _text(rng: random.Random, nbytes: int, with_word: bool) -> str:
    words = []
    size = 0
    while size < nbytes:
        w = rng.choice(WORDS)
        words.append(w)
        size += len(w) + 1
    if with_word:
        words.insert(rng.randrange(len(words)), BODY_WORD)
    lines, line = [], []
    for w in words:
        line.append(w)
        if len(line) >= 12:
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    return "\r\n".join(lines)


def _qp(text: str) -> str:
    import quopri
    return quopri.encodestring(text.encode("utf-8")).decode("ascii").replace("\r\n", "\n").replace("\n", "\r\n")


def make_message(i: int, rng: random.Random) -> tuple[bytes, int]:
    """(bytes, internal date as a Unix time) of message i."""
    date = datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=37 * i)
    sender = rng.choice(NAMES)
    subject = rng.choice(SUBJECTS).format(n=i)
    if rng.random() < 0.10:
        subject = f"{HEADER_WORD} report {i}: {subject}"
    with_word = rng.random() < 0.02
    headers = [
        f"Return-Path: <user{i % 97}@example.org>",
        f"Received: from mx.example.org (mx.example.org [192.0.2.{i % 250}]) by mail.bench.test "
        f"with ESMTPS; {format_datetime(date)}",
        f"From: {_encoded(sender)} <user{i % 97}@example.org>",
        "To: Bench User <bench@bench.test>",
        f"Subject: {_encoded(subject)}",
        f"Date: {format_datetime(date)}",
        f"Message-ID: <{i}.{rng.getrandbits(48):x}@example.org>",
        "MIME-Version: 1.0",
    ]
    if i % 5 == 0:
        headers.append(f"In-Reply-To: <{i - 1}.0@example.org>")
    kind = rng.random()
    text = _text(rng, rng.randint(300, 4000), with_word)
    if kind < 0.5:
        headers += ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: quoted-printable"]
        body = _qp(text)
    elif kind < 0.75:
        b = f"alt-{i}"
        html = "<html><body><p>" + text.replace("\r\n", "</p>\r\n<p>") + "</p></body></html>"
        headers.append(f'Content-Type: multipart/alternative; boundary="{b}"')
        body = (f"This is a multi-part message in MIME format.\r\n\r\n--{b}\r\n"
                "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
                f"{_qp(text)}\r\n--{b}\r\n"
                "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
                f"{_qp(html)}\r\n--{b}--\r\n")
    else:
        b = f"mix-{i}"
        size = int(rng.lognormvariate(9.5, 0.9))  # median ~13 KB, a long tail of bigger files
        size = max(512, min(size, 400_000))
        payload = base64.encodebytes(rng.randbytes(size)).decode("ascii").replace("\n", "\r\n")
        fname = rng.choice(["Rechnung-Übersicht.pdf", "photo.jpg", "報告書.docx", "data.zip"])
        headers.append(f'Content-Type: multipart/mixed; boundary="{b}"')
        body = (f"--{b}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable"
                f"\r\n\r\n{_qp(text)}\r\n--{b}\r\n"
                f"Content-Type: application/octet-stream; name=\"{_encoded(fname)}\"\r\n"
                "Content-Transfer-Encoding: base64\r\n"
                f"Content-Disposition: attachment; filename*=utf-8''{_pct(fname)}\r\n\r\n"
                f"{payload}--{b}--\r\n")
    raw = ("\r\n".join(headers) + "\r\n\r\n" + body).encode("ascii")
    return raw, int(date.timestamp())


def _pct(s: str) -> str:
    from urllib.parse import quote
    return quote(s, safe="")


def build(directory: Path, count: int, seed: int = 7) -> list[tuple[str, int]]:
    """Write `count` messages into `directory` (once; reused if complete). Returns
    [(file name, size)] in delivery order."""
    directory.mkdir(parents=True, exist_ok=True)
    index = directory / f"index-{count}-{seed}"
    if index.exists():
        return [(n, int(s)) for n, s in (line.split() for line in index.read_text().splitlines())]
    rng = random.Random(seed)
    out = []
    for i in range(count):
        raw, date = make_message(i, rng)
        name = f"{date}.M{i}P1Q{i}.bench,S={len(raw)},W={len(raw)}"
        (directory / name).write_bytes(raw)
        os.utime(directory / name, (date, date))
        out.append((name, len(raw)))
    index.write_text("".join(f"{n} {s}\n" for n, s in out))
    return out


def link_into(files: list[tuple[str, int]], corpus_dir: Path, maildir: Path, owner: tuple[int, int] | None) -> None:
    """Hard-link the corpus into maildir/new/ (as a delivery would leave them)."""
    new = maildir / "new"
    new.mkdir(parents=True, exist_ok=True)
    for name, _ in files:
        os.link(corpus_dir / name, new / name)
    if owner:
        # Files are shared with the corpus: make them readable; Dovecot only needs to rename
        # them (directory write permission) and read them.
        for name, _ in files:
            os.chmod(new / name, 0o644)
        for sub in ("", "new", "cur", "tmp"):
            (maildir / sub).mkdir(exist_ok=True)
            os.chown(maildir / sub, *owner)
