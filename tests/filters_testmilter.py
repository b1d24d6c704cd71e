"""A milter for the tests, written with purepythonmilter (an independent implementation of
the milter protocol): the Subject of a message says which action it answers with.

    python3 tests/filters_testmilter.py PORT LOGFILE

Subject "all-actions": every modification at once (add/insert/change/delete header,
replace body, add/delete recipient, change sender); "reject", "tempfail", "replycode",
"discard", "quarantine", "accept": that verdict.  Recipient "rcpt-reject@…" is refused
at RCPT.  Every command's macros are appended to LOGFILE as JSON lines, so a test can
check what the MTA sent.
"""
from __future__ import annotations

import json
import sys

from purepythonmilter import (Accept, AddRecipient, AppendHeader, ChangeHeader, ChangeMailFrom, Continue,
                              DiscardMessage, InsertHeader, PurePythonMilter, Reject, RejectWithCode,
                              RemoveRecipient, ReplaceBodyChunk, TempFailWithCode, VerdictOrContinue)
import attrs
from purepythonmilter.protocol.responses import AbstractManipulation


@attrs.define(auto_attribs=False, kw_only=True)
class Quarantine(AbstractManipulation):
    """SMFIR_QUARANTINE as libmilter's smfi_quarantine() sends it: a modification at end of
    message, followed by the final answer (purepythonmilter 1.2's own Quarantine class has no
    usable `reason` field and is sent as the final answer, which Postfix would wait past)."""

    response_char = b"q"
    reason: str = attrs.field()

    def encode(self) -> bytes:
        return self.response_char + self.reason.encode() + b"\x00"

LOG = sys.argv[2] if len(sys.argv) > 2 else "/dev/null"
subjects: dict[str, str] = {}  # the Subject of the message in progress (the tests send one at a time)


def record(stage: str, cmd, **extra) -> None:
    with open(LOG, "a") as f:
        f.write(json.dumps({"stage": stage, "macros": dict(getattr(cmd, "macros", {}) or {}), **extra}) + "\n")


async def on_connect(cmd) -> None:
    record("connect", cmd, hostname=cmd.connection_info_args.hostname)


async def on_helo(cmd) -> None:
    record("helo", cmd, helo=cmd.hostname)


async def on_mail_from(cmd) -> None:
    record("mail", cmd, address=cmd.address)


async def on_rcpt_to(cmd) -> VerdictOrContinue:
    record("rcpt", cmd, address=cmd.address)
    if cmd.address.startswith("rcpt-reject@"):
        return RejectWithCode(primary_code=(5, 5, 0), enhanced_code=(5, 7, 1), text="recipient refused by test milter")
    return Continue()


async def on_header(cmd) -> None:
    if cmd.name.lower() == "subject":
        subjects["current"] = cmd.text.strip()
        record("header", cmd, name=cmd.name, text=cmd.text)


async def on_end_of_message(cmd) -> VerdictOrContinue:
    subject = subjects.pop("current", "")
    record("eom", cmd, subject=subject)
    if subject == "all-actions":
        return Continue(manipulations=[
            AppendHeader(headername="X-Test-Added", headertext="appended"),
            InsertHeader(headername="X-Test-Inserted", headertext="at the top", index=0),
            ChangeHeader(headername="Subject", headertext="changed by milter", nth_occurrence=1),
            ChangeHeader(headername="X-Delete-Me", headertext="", nth_occurrence=1),
            ReplaceBodyChunk(chunk=b"replaced body\r\n"),
            AddRecipient(recipient="<carol@example.test>"),
            RemoveRecipient(recipient="<bob@example.test>"),
            ChangeMailFrom(mail_from="<changed@example.test>"),
        ])
    if subject == "reject":
        return Reject()
    if subject == "replycode":
        return RejectWithCode(primary_code=(5, 5, 3), enhanced_code=(5, 7, 0), text="custom refusal from milter")
    if subject == "tempfail":
        return TempFailWithCode(primary_code=(4, 5, 1), enhanced_code=(4, 7, 1), text="test milter says later")
    if subject == "discard":
        return DiscardMessage()
    if subject == "quarantine":
        # Quarantine is a modification followed by a final answer (Postfix milter8.c reads on)
        return Continue(manipulations=[Quarantine(reason="held by test milter")])
    if subject == "accept":
        return Accept()
    return Continue()


milter = PurePythonMilter(
    name="mailstack-test", hook_on_connect=on_connect, hook_on_helo=on_helo, hook_on_mail_from=on_mail_from,
    hook_on_rcpt_to=on_rcpt_to, hook_on_header=on_header, hook_on_end_of_message=on_end_of_message,
    can_add_headers=True, can_change_headers=True, can_change_body=True, can_add_recipients=True,
    can_remove_recipients=True, can_change_mail_from=True, can_quarantine=True, restrict_symbols=None)

if __name__ == "__main__":
    milter.run_server(host="127.0.0.1", port=int(sys.argv[1]))
