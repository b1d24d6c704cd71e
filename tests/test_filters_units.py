"""Content filters without daemons: the milter codec (fuzzed), how modifications apply,
the milter client against a milter speaking raw protocol over a real socket (progress,
skip, symbol lists, timeouts, broken answers), the HTTP answer parser (fuzzed), and how
rspamd / spamd / clamd answers become verdicts."""
from __future__ import annotations

import asyncio
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstack.filters import base, clamd, http, rspamd, spamd
from mailstack.filters.base import FilterUnavailable
from mailstack.filters.milter import codec
from mailstack.filters.milter.chain import ConnState, MilterChain
from mailstack.filters.milter.client import parse_milter
from mailstack.smtp.hooks import Connection, Transaction

MSG = (b"From: a@example.org\r\nSubject: hello\r\nX-Multi: one\r\n\tfolded\r\nX-Multi: two\r\n\r\n"
       b"body line\r\n")


# --- codec ------------------------------------------------------------------------------------------
def test_encode_commands_as_postfix_sends_them():
    assert codec.encode_optneg() == struct.pack("!IcIII", 13, b"O", 6, codec.ALL_ACTIONS, codec.MTA_PROTOCOL)
    assert codec.encode_connect("host.example", "192.0.2.1", 25) == (
        struct.pack("!I", 1 + 13 + 1 + 2 + 10) + b"Chost.example\x004" + struct.pack("!H", 25) + b"192.0.2.1\x00")
    assert codec.encode_connect("h", "2001:db8::1")[5:].startswith(b"h\x006")
    assert codec.encode_envelope(codec.MAIL, "a@b", ["SIZE=10"]) == struct.pack("!I", 15) + b"M<a@b>\x00SIZE=10\x00"
    assert codec.encode_macros(codec.CONNECT, {"j": "mx", "{daemon_name}": "smtp"}) == (
        struct.pack("!I", 26) + b"DCj\x00mx\x00{daemon_name}\x00smtp\x00")
    chunks = codec.encode_body(b"x" * 70000)
    assert [len(c) for c in chunks] == [5 + 65535, 5 + 4465]
    assert codec.encode_header("Subject", "a\0b") == struct.pack("!I", 12) + b"LSubject\x00ab\x00"


def test_decode_every_response():
    wire = b"".join([
        codec.packet(b"O", struct.pack("!III", 6, 0x1FF, 0x400) + struct.pack("!I", 1) + b"{rcpt_addr} i\x00"),
        codec.packet(b"p"), codec.packet(b"c"), codec.packet(b"y", b"550 5.7.1 no\x00"),
        codec.packet(b"h", b"X-A\x00va\x00"), codec.packet(b"i", struct.pack("!I", 0) + b"X-I\x00vi\x00"),
        codec.packet(b"m", struct.pack("!I", 2) + b"X-M\x00\x00"), codec.packet(b"b", b"new body"),
        codec.packet(b"+", b"<x@y>\x00"), codec.packet(b"2", b"<x@y>\x00NOTIFY=NEVER\x00"),
        codec.packet(b"-", b"<z@y>\x00"), codec.packet(b"e", b"<s@y>\x00"), codec.packet(b"q", b"why\x00"),
        codec.packet(b"s"), codec.packet(b"a"), codec.packet(b"d"), codec.packet(b"r"), codec.packet(b"t"),
    ])
    d = codec.Decoder()
    out = []
    for i in range(0, len(wire), 7):  # arbitrary splits: the decoder buffers
        out += d.feed(wire[i:i + 7])
    assert [r.code for r in out] == [b"O", b"p", b"c", b"y", b"h", b"i", b"m", b"b", b"+", b"2", b"-", b"e", b"q",
                                     b"s", b"a", b"d", b"r", b"t"]
    assert out[0].symlists == {1: ["{rcpt_addr}", "i"]} and out[0].protocol == 0x400
    assert out[3].text == "550 5.7.1 no"
    assert (out[5].index, out[5].name, out[5].value) == (0, "X-I", "vi")
    assert (out[6].index, out[6].value) == (2, "")
    assert out[9].args == ["NOTIFY=NEVER"]


@pytest.mark.parametrize("bad", [struct.pack("!I", 0), struct.pack("!I", 2**31) + b"h",
                                 codec.packet(b"y", b"hello\x00"), codec.packet(b"y", b"250 ok\x00"),
                                 codec.packet(b"h", b"only-name\x00"), codec.packet(b"Z"),
                                 codec.packet(b"m", b"\x00\x00"), codec.packet(b"O", b"\x00" * 5)])
def test_decoder_refuses_garbage(bad):
    with pytest.raises(codec.ProtocolError):
        codec.Decoder().feed(bad)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_fuzz_raises_only_protocol_error(data):
    d = codec.Decoder(max_packet=4096)
    try:
        d.feed(data)
        d.feed(data[::-1])
    except codec.ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"h", b"i", b"m", b"b", b"+", b"-", b"e", b"q"]), max_size=8),
       st.lists(st.text(alphabet="abcXY-: \n\r\t", max_size=12), min_size=3, max_size=3),
       st.integers(0, 5))
def test_apply_modifications_fuzz_keeps_a_message(codes, texts, index):
    mods = []
    for c in codes:
        mods.append(codec.Response(c, text=f"<{texts[0]}@x>", name="X-" + (texts[1].strip(" :\n") or "h"),
                                   value=texts[2], index=index, body=texts[2].encode()))
    try:
        changes = codec.apply_modifications(MSG, mods)
    except codec.ProtocolError:
        return  # a header name that is not one: the milter's answer is refused as a whole
    out = changes.message if changes.message is not None else MSG
    assert b"\r\n\r\n" in out and b"\n" not in out.replace(b"\r\n", b"")
    # every header line is a header or a continuation: no value started a header of its own
    headers, _ = codec.split_message(out)
    assert [n for n, _ in headers if n.startswith(b"X-")] == [n for n, v in headers if n.startswith(b"X-")]
    for line in out.split(b"\r\n\r\n")[0].split(b"\r\n"):
        assert line[:1] in (b" ", b"\t") or b":" in line


def test_apply_modifications_libmilter_semantics():
    mods = [codec.Response(codec.R_CHGHEADER, name="X-Multi", value="second changed", index=2),
            codec.Response(codec.R_CHGHEADER, name="x-multi", value="", index=1),
            codec.Response(codec.R_CHGHEADER, name="X-New", value="added as missing", index=1),
            codec.Response(codec.R_INSHEADER, name="X-Top", value="first", index=0),
            codec.Response(codec.R_ADDHEADER, name="X-End", value="multi\nline"),
            codec.Response(codec.R_REPLBODY, body=b"new\nbody"), codec.Response(codec.R_REPLBODY, body=b" more\n"),
            codec.Response(codec.R_ADDRCPT, text="<n@x>"), codec.Response(codec.R_DELRCPT, text="<o@x>"),
            codec.Response(codec.R_CHGFROM, text="<s@x>", args=["SIZE=1"]),
            codec.Response(codec.R_QUARANTINE, text="hold it")]
    ch = codec.apply_modifications(MSG, mods)
    assert ch.message == (b"X-Top: first\r\nFrom: a@example.org\r\nSubject: hello\r\nX-Multi: second changed\r\n"
                          b"X-New: added as missing\r\nX-End: multi\r\n line\r\n\r\nnew\r\nbody more\r\n")
    assert (ch.add_rcpts, ch.del_rcpts, ch.sender, ch.quarantine) == (["n@x"], ["o@x"], "s@x", "hold it")


def test_split_join_roundtrip_and_milter_values():
    headers, body = codec.split_message(MSG)
    assert headers[2] == (b"X-Multi", b" one\r\n\tfolded") and body == b"body line\r\n"
    assert codec.join_message(headers, body) == MSG
    assert codec.milter_value(b" one\r\n\tfolded", False) == b"one\n\tfolded"
    assert codec.milter_value(b" one", True) == b" one"


def test_parse_milter_settings():
    m = parse_milter("inet:127.0.0.1:8891 default_action=accept command_timeout=5s",
                     {"default_action": "tempfail", "connect_timeout": 1.0, "command_timeout": 1.0,
                      "content_timeout": 1.0})
    assert (m.host, m.port, m.default_action, m.command_timeout) == ("127.0.0.1", 8891, "accept", 5.0)
    assert parse_milter("unix:/run/x.sock", {}).path == "/run/x.sock"
    for bad in ("tcp:1", "inet:host", "inet:h:1 bogus=1", "inet:h:1 default_action=maybe"):
        with pytest.raises(ValueError):
            parse_milter(bad, {"default_action": "tempfail", "connect_timeout": 1.0, "command_timeout": 1.0,
                               "content_timeout": 1.0})


# --- the client against a raw milter on a real socket --------------------------------------------------
class RawMilter:
    """A milter scripted in raw protocol (codec's packets), over a real TCP socket."""

    def __init__(self, script) -> None:
        self.script = script  # async fn(reader, writer, commands: list)
        self.commands: list[tuple[bytes, bytes]] = []

    async def __aenter__(self):
        async def handle(reader, writer):
            try:
                await self.script(self, reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()
        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def read(self, reader) -> tuple[bytes, bytes]:
        (n,) = struct.unpack("!I", await reader.readexactly(4))
        data = await reader.readexactly(n)
        self.commands.append((data[:1], data[1:]))
        return data[:1], data[1:]

    async def until(self, reader, code: bytes) -> None:
        while (await self.read(reader))[0] != code:
            pass


def chain_for(port: int, **kw) -> MilterChain:
    cfg = parse_milter(f"inet:127.0.0.1:{port}", {"default_action": kw.get("default", "tempfail"),
                                                    "connect_timeout": 2.0, "command_timeout": kw.get("cmd", 2.0),
                                                    "content_timeout": kw.get("content", 2.0)})
    return MilterChain([cfg])


# A milter that answers nothing but the end of the message.
NO_REPLIES = (codec.P_NR_CONN | codec.P_NR_HELO | codec.P_NR_MAIL | codec.P_NR_RCPT | codec.P_NR_DATA
              | codec.P_NR_HDR | codec.P_NR_EOH | codec.P_NR_BODY)
CONN = Connection(ip="192.0.2.7", listener="smtp", hostname="mx.example.test", helo="client.example")


async def conversation(chain: MilterChain, message: bytes = MSG):
    state = ConnState()
    txn = Transaction(mail_from="a@example.org", qid="QID1")
    replies = [await chain.connect(CONN, state), await chain.helo(CONN, state),
               await chain.mail(CONN, txn, state), await chain.rcpt(CONN, txn, "b@example.test", state)]
    txn.rcpts.append("b@example.test")
    verdict = await chain.data(CONN, txn, message, state)
    chain.close(state)
    return replies, verdict


def test_progress_skip_symlist_and_no_reply_steps():
    async def script(m, reader, writer):
        await m.read(reader)  # optneg: ask for macro "i" only at EOM, no replies to helo, body skippable
        sym = struct.pack("!I", codec.STAGE_EOM) + b"i\x00" + struct.pack("!I", codec.STAGE_CONNECT) + b"j\x00"
        writer.write(codec.packet(b"O", struct.pack("!III", 6, codec.ALL_ACTIONS,
                                                    codec.P_NR_HELO | codec.P_SKIP | codec.P_NOHDRS) + sym))
        await m.until(reader, b"C")
        writer.write(codec.packet(b"c"))
        await m.until(reader, b"M")
        writer.write(codec.packet(b"p") + codec.packet(b"c"))  # progress, then the answer
        await m.until(reader, b"R")
        writer.write(codec.packet(b"c"))
        await m.until(reader, b"T")
        writer.write(codec.packet(b"c"))
        await m.until(reader, b"N")
        writer.write(codec.packet(b"c"))
        await m.until(reader, b"B")
        writer.write(codec.packet(b"s"))  # skip the rest of the body
        await m.until(reader, b"E")
        for _ in range(3):  # a slow milter says it is alive: the content timeout starts again
            await asyncio.sleep(0.4)
            writer.write(codec.packet(b"p"))
        writer.write(codec.packet(b"h", b"X-Raw\x00yes\x00") + codec.packet(b"a"))
        await m.until(reader, b"Q")

    async def run():
        async with RawMilter(script) as m:
            replies, verdict = await conversation(chain_for(m.port, content=1.0),
                                                  b"Subject: s\r\n\r\n" + b"x" * 140000)
            return m, replies, verdict
    m, replies, verdict = asyncio.run(run())
    assert replies == [None] * 4
    assert verdict.reply is None and verdict.message.startswith(b"Subject: s\r\nX-Raw: yes\r\n\r\n")
    codes = [c for c, _ in m.commands]
    assert b"H" in codes and b"L" not in codes  # helo sent unanswered; headers not sent at all
    assert codes.count(b"B") == 1  # skipped after the first chunk
    macros = [d for c, d in m.commands if c == b"D"]
    assert b"Cj\x00mx.example.test\x00" in macros  # connect: only j, as asked
    assert b"Ei\x00QID1\x00" in macros


@pytest.mark.parametrize("default,expect", [("tempfail", "451 4.7.1 Service unavailable - try again later"),
                                            ("reject", "550 5.7.1 Command rejected"), ("accept", None)])
def test_slow_milter_gets_default_action_in_time(default, expect):
    async def script(m, reader, writer):
        await m.read(reader)
        writer.write(codec.packet(b"O", struct.pack("!III", 6, 0, NO_REPLIES)))
        await m.until(reader, b"E")
        await asyncio.sleep(5)  # never answers end of message in time

    async def run():
        async with RawMilter(script) as m:
            started = time.monotonic()
            replies, verdict = await conversation(chain_for(m.port, default=default, content=0.5))
            return replies, verdict, time.monotonic() - started
    replies, verdict, took = asyncio.run(run())
    assert replies == [None] * 4 and verdict.reply == expect
    assert 0.4 < took < 2.0


def test_milter_down_tempfails_from_mail_on_and_broken_answer_too():
    async def run():
        chain = chain_for(1)  # nothing listens on port 1
        state = ConnState()
        txn = Transaction(mail_from="a@example.org")
        assert await chain.connect(CONN, state) is None  # the greeting is not delayed by a refusal
        return await chain.mail(CONN, txn, state)
    assert asyncio.run(run()) == "451 4.7.1 Service unavailable - try again later"

    async def script(m, reader, writer):
        await m.read(reader)
        writer.write(codec.packet(b"O", struct.pack("!III", 6, 0, NO_REPLIES)))
        await m.until(reader, b"E")
        writer.write(codec.packet(b"h", b"X-Not-Allowed\x00x\x00") + codec.packet(b"c"))  # ADDHDRS not asked for

    async def broken():
        async with RawMilter(script) as m:
            return await conversation(chain_for(m.port))
    _, verdict = asyncio.run(broken())
    assert verdict.reply == "451 4.7.1 Service unavailable - try again later"


# --- HTTP, rspamd, spamd, clamd --------------------------------------------------------------------------
def test_http_parse_response():
    assert http.parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}") == (200, {"content-length": "2"},
                                                                                      b"{}")
    assert http.parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}") is None
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"
    assert http.parse_response(chunked)[2] == b"abc"
    assert http.parse_response(b"HTTP/1.0 204 x\r\n\r\nrest", eof=True) == (204, {}, b"rest")
    with pytest.raises(http.BadResponse):
        http.parse_response(b"SMTP 220\r\n\r\n")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_http_parse_fuzz(data, eof):
    try:
        http.parse_response(b"HTTP/1.1 200 OK\r\n" + data, eof)
        http.parse_response(data, eof)
    except http.BadResponse:
        pass


@pytest.mark.parametrize("action,reply,junk", [
    ("reject", "554 5.7.1 Gtube pattern", False), ("soft reject", "451 4.7.1 Gtube pattern", False),
    ("greylist", "451 4.7.1 Gtube pattern", False), ("add header", None, True), ("rewrite subject", None, True),
    ("no action", None, False)])
def test_rspamd_actions(action, reply, junk):
    result = {"action": action, "score": 7.5, "required_score": 15, "subject": "***SPAM*** hello",
              "messages": {"smtp_message": "Gtube pattern"}, "symbols": {"A": {"score": 7.5, "options": ["x"]}},
              "dkim-signature": "v=1; a=rsa-sha256; d=example.test"}
    v = rspamd.verdict_for(result, action, 7.5, 15.0, MSG)
    assert v.reply == reply
    assert bool(v.meta.get("junk")) == junk
    if reply is None:
        headers = dict(v.headers)
        assert headers["X-Spamd-Result"] == f"default: {junk} [7.50 / 15.00];\n\tA(7.50)[x]"
        assert headers["DKIM-Signature"] == "v=1; a=rsa-sha256; d=example.test"
        assert (b"Subject: ***SPAM*** hello\r\n" in (v.message or b"")) == (action == "rewrite subject")


def test_spamd_verdict_and_reject_score():
    v = spamd.verdict_for(True, 7.2, 5.0, "preamble\nContent analysis details:   (7.2 points)\n 7.2 RULE x\n", 0)
    assert dict(v.headers)["X-Spam-Status"] == "Yes, score=7.2 required=5.0"
    assert dict(v.headers)["X-Spam-Report"] == "Content analysis details:   (7.2 points)\n\t 7.2 RULE x"
    assert v.meta["junk"] and v.reply is None
    assert spamd.verdict_for(True, 20.0, 5.0, "", 15.0).reply == "554 5.7.1 Spam message rejected (score 20.0)"
    assert "junk" not in spamd.verdict_for(False, 1.0, 5.0, "", 0).meta


def test_clamd_replies():
    assert clamd.parse_reply(b"stream: OK\0") is None
    assert clamd.parse_reply(b"stream: Eicar-Test-Signature FOUND\0") == "Eicar-Test-Signature"
    with pytest.raises(FilterUnavailable):
        clamd.parse_reply(b"INSTREAM size limit exceeded. ERROR\0")
    with pytest.raises(FilterUnavailable):
        clamd.parse_reply(b"")


def test_strip_and_replace_headers():
    msg = b"X-Spam-Status: No\r\n\tfolded\r\nSubject: a\r\nx-spam-flag: NO\r\n\r\nX-Spam-Status: body\r\n"
    assert base.strip_headers(msg, {b"x-spam-status", b"x-spam-flag"}) == b"Subject: a\r\n\r\nX-Spam-Status: body\r\n"
    assert base.strip_headers(MSG, {b"x-none"}) is MSG
    assert base.replace_subject(b"Subject: a\r\n b\r\nX: y\r\n\r\nbody", "new") == b"Subject: new\r\nX: y\r\n\r\nbody"
    assert base.replace_subject(b"X: y\r\n\r\nbody", "new") == b"X: y\r\nSubject: new\r\n\r\nbody"


# --- configuration -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("keys,message", [
    ({"milters": ["tcp:127.0.0.1:1"]}, "filters.milters: 'tcp:127.0.0.1:1': expected inet:HOST:PORT or unix:/PATH"),
    ({"milters": ["inet:h:1 default_action=maybe"]}, "filters.milters: 'default_action=maybe'"),
    ({"order": ["clamd", "amavis"]}, "filters.order: unknown filter 'amavis'"),
    ({"listeners": ["imap"]}, "filters.listeners: unknown listener 'imap'"),
    ({"rspamd_url": "127.0.0.1:11333"}, "filters.rspamd_url: '127.0.0.1:11333': expected http://HOST:PORT"),
    ({"clamd_address": "clamd"}, "filters.clamd_address: 'clamd': expected HOST:PORT or unix:/PATH"),
    ({"learn": "bogofilter"}, "filters.learn: must be one of"),
])
def test_bad_filter_config_names_the_key(tmp_path, keys, message):
    from mailstack import config
    with pytest.raises(config.ConfigError) as e:
        config.from_dict({"filters": keys}, base=tmp_path)
    assert str(e.value).startswith(message), str(e.value)
