"""`mailstack queue list|show|cat|delete|hold|release|requeue|flush`, `mailstack mailq`, `mailstack sendmail`.

Postfix's meaning (postqueue, postsuper, postcat): `delete|hold|requeue ID... | ALL [STATE...]`
act on those messages, or on every message (of one state only when STATE is given); the
word ALL only in upper case; an unknown word is an error that changes nothing.

Listing reads the spool directories directly, so it works whether the server runs
or not.  Actions go through the control socket when a server runs (they take
effect at once and are safe against a delivery in progress); when none runs they
are renames and unlinks of the queue files.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import sys
import time

from . import control
from .spool import QUEUE_STATES, CorruptQueueFile, Spool, read_envelope, valid_qid

# Which states `ACTION ALL` covers without a STATE word, and which STATE words it accepts.
ALL_STATES = {
    "delete": QUEUE_STATES,
    "hold": ("incoming", "active", "deferred"),
    "release": ("hold",),
    "requeue": QUEUE_STATES,
}


class UsageError(Exception):
    """A command line that must change nothing; str() is the one line to print."""

_MARK = {"active": "*", "incoming": "*", "hold": "!", "maildrop": "+"}


def add_commands(sub) -> None:
    q = sub.add_parser("queue", help="the mail queue: list, show, cat, delete, hold, release, requeue, flush",
                       description="Act on the mail queue (Postfix's postqueue/postsuper/postcat). Actions reach "
                                   "a running server through its control socket; without one they act on the "
                                   "queue files.")
    qsub = q.add_subparsers(dest="queue_action", metavar="ACTION")
    qsub.required = True
    p = qsub.add_parser("list", help="queued messages, all or filtered (like Postfix's mailq)")
    _list_options(p)
    p = qsub.add_parser("show", help="envelope and per-recipient delivery history of one message")
    p.add_argument("id", help="queue id")
    p.add_argument("--json", action="store_true", help="one JSON document instead of text")
    p = qsub.add_parser("cat", help="the message as queued: envelope, headers, body (like postcat -q)")
    p.add_argument("id", help="queue id")
    part = p.add_mutually_exclusive_group()
    part.add_argument("--headers-only", "-H", action="store_true", help="only the message headers (postcat -h)")
    part.add_argument("--body-only", "-b", action="store_true", help="only the message body (postcat -b)")
    part.add_argument("--envelope-only", "-e", action="store_true", help="only the envelope (postcat -e)")
    for action, text in (("delete", "delete messages; no bounce is sent (postsuper -d)"),
                         ("hold", "put messages on hold: not delivered until released (postsuper -h)"),
                         ("release", "release held messages and try them at once (postsuper -H)"),
                         ("requeue", "take messages up again as if new, at once; recipients already "
                                     "delivered are not delivered again (postsuper -r)")):
        states = ", ".join(ALL_STATES[action])
        p = qsub.add_parser(action, help=text, description=f"{text}. `{action} ALL` acts on every message in "
                            f"{states}; `{action} ALL STATE...` only on those in these states.")
        p.add_argument("ids", nargs="+", metavar="ID|ALL", help="queue ids, or ALL (upper case) optionally "
                       f"followed by states ({states})")
    p = qsub.add_parser("flush", help="try deferred messages now (server must be running; postqueue -f / -s)")
    p.add_argument("--domain", metavar="DOMAIN", help="only messages waiting for this destination "
                   "(postqueue -s DOMAIN)")
    q.set_defaults(func=run)

    m = sub.add_parser("mailq", help="same as `queue list`")
    _list_options(m)
    m.set_defaults(func=run, queue_action="list")

    from .maildrop import add_parser

    add_parser(sub)


def _list_options(p) -> None:
    p.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    p.add_argument("--state", action="append", choices=QUEUE_STATES + ("maildrop",),
                   help="only messages in this state (repeatable)")
    p.add_argument("--from", dest="sender", metavar="PATTERN",
                   help="only messages whose sender matches (substring, or a glob with * ?; case ignored)")
    p.add_argument("--to", dest="recipient", metavar="PATTERN",
                   help="only messages with a waiting recipient that matches (as --from)")
    p.add_argument("--older-than", metavar="AGE", type=parse_age,
                   help="only messages queued longer than AGE: seconds, or a number with s, m, h or d")


def parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not m:
        import argparse
        raise argparse.ArgumentTypeError(f"{text!r} is not an age (e.g. 90, 30m, 2h, 1d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def run(args, cfg) -> int:
    action = args.queue_action
    try:
        if action == "list":
            return cmd_list(args, cfg)
        if action == "show":
            return cmd_show(args, cfg)
        if action == "cat":
            return cmd_cat(args, cfg)
        if action == "flush":
            return cmd_flush(args, cfg)
        return cmd_change(args, cfg, action)
    except UsageError as e:
        print(f"mailstack queue {action}: {e}", file=sys.stderr)
        return 2
    except control.ControlError as e:
        print(f"mailstack queue: {e}", file=sys.stderr)
        return 1


# --- reading the spool (blocking; also used by the control socket) ----------------------------------
def _summary_targets(status: dict | None, recipients: list[str]) -> list[dict]:
    if status and status.get("targets"):
        return [{"addr": t.get("addr"), "orig": t.get("orig"), "status": t.get("status"),
                 "reply": t.get("reply", ""), "attempts": t.get("attempts", 0)} for t in status["targets"]]
    return [{"addr": r, "orig": r, "status": "pending", "reply": "", "attempts": 0} for r in recipients]


def collect(spool: Spool) -> list[dict]:
    """Every message in the queue (and the maildrop), oldest first."""
    out = []
    for state, qid in spool.entries(QUEUE_STATES + ("maildrop",)):
        try:
            msg = read_envelope(spool.path(state, qid), qid)
        except FileNotFoundError:
            continue  # moved or removed while we looked
        except CorruptQueueFile as e:
            out.append({"qid": qid, "state": state, "size": 0, "arrival": 0, "sender": "?", "recipients": [],
                        "error": str(e)})
            continue
        status = spool.read_status(qid) if state != "maildrop" else None
        targets = _summary_targets(status, msg.recipients)
        errors = [t["reply"] for t in targets if t["status"] in ("deferred", "pending") and t["reply"]]
        out.append({"qid": qid, "state": state, "size": msg.source.size, "arrival": msg.arrival,
                    "sender": msg.sender, "recipients": [t for t in targets if t["status"] in ("pending", "deferred")],
                    "error": errors[-1] if errors else "",
                    "next_try": status.get("next_try") if status else None})
    out.sort(key=lambda m: m["qid"])
    return out


def show_from_files(spool: Spool, qid: str) -> dict | None:
    state = spool.locate(qid, QUEUE_STATES + ("maildrop", "corrupt"))
    if state is None:
        return None
    try:
        msg = read_envelope(spool.path(state, qid), qid)
    except (FileNotFoundError, CorruptQueueFile) as e:
        return {"qid": qid, "state": state, "error": str(e)}
    status = spool.read_status(qid) or {}
    targets = status.get("targets") or [{"addr": r, "kind": "", "orig": r, "status": "pending", "attempts": 0,
                                         "reply": "", "relay": "none", "last_try": 0, "history": []}
                                        for r in msg.recipients]
    return {"qid": qid, "state": state, "sender": msg.sender, "recipients": msg.recipients,
            "arrival": msg.arrival, "size": msg.source.size, "meta": msg.meta,
            "attempts": status.get("attempts", 0), "next_try": status.get("next_try"), "targets": targets}


# --- formatting -----------------------------------------------------------------------------------------
def _date(t: float | None) -> str:
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(t)) if t else "-"


def format_mailq(messages: list[dict]) -> str:
    """Postfix mailq layout, plus a state column."""
    if not messages:
        return "Mail queue is empty\n"
    pad = " " * 50
    lines = ["-Queue ID-      --Size-- ----Arrival Time---- -State-- -Sender/Recipient-------"]
    total = 0
    for m in messages:
        total += m["size"]
        qid = m["qid"] + _MARK.get(m["state"], " ")
        lines.append(f"{qid:<15} {m['size']:>8} {_date(m['arrival']):<20} {m['state']:<8} "
                     f"{m['sender'] or 'MAILER-DAEMON'}")
        shown_error = None
        for r in m["recipients"]:
            if r.get("reply") and r["reply"] != shown_error:
                lines.append(f"{pad}({r['reply']})")
                shown_error = r["reply"]
            lines.append(f"{pad}{r['addr']}")
        if m.get("error") and not m["recipients"]:
            lines.append(f"{pad}({m['error']})")
        lines.append("")
    n = len(messages)
    lines.append(f"-- {(total + 1023) // 1024} Kbytes in {n} Request{'s' if n != 1 else ''}.")
    return "\n".join(lines) + "\n"


def format_show(info: dict) -> str:
    lines = [f"Queue ID:  {info['qid']}", f"State:     {info['state']}"]
    if "error" in info and "sender" not in info:
        lines.append(f"Error:     {info['error']}")
        return "\n".join(lines) + "\n"
    lines += [f"Arrival:   {_date(info['arrival'])}",
              f"Size:      {info['size']}",
              f"Sender:    <{info['sender']}>",
              f"Attempts:  {info.get('attempts', 0)}"]
    if info.get("next_try") and info["state"] == "deferred":
        lines.append(f"Next try:  {_date(info['next_try'])}")
    meta = info.get("meta") or {}
    if meta:
        lines.append("Meta:      " + ", ".join(f"{k}={v}" for k, v in sorted(meta.items())))
    lines.append("Recipients:")
    for t in info.get("targets", []):
        orig = f" (for <{t['orig']}>)" if t.get("orig") and t["orig"].lower() != t["addr"].lower() else ""
        lines.append(f"  <{t['addr']}>{orig}: {t.get('status')}, attempts={t.get('attempts', 0)}, "
                     f"relay={t.get('relay', 'none')}, last try={_date(t.get('last_try'))}")
        if t.get("reply"):
            lines.append(f"      last reply: {t['reply']}")
        for when, status, reply in t.get("history") or []:
            lines.append(f"      {_date(when)}  {status}: {reply}")
    return "\n".join(lines) + "\n"


def _matches(pattern: str, value: str) -> bool:
    pattern, value = pattern.lower(), (value or "").lower()
    return fnmatch.fnmatchcase(value, pattern) if any(c in pattern for c in "*?[") else pattern in value


def filter_messages(messages: list[dict], args, now: float | None = None) -> list[dict]:
    """queue list's --state / --from / --to / --older-than, all of them together."""
    now = time.time() if now is None else now
    states = getattr(args, "state", None)
    sender = getattr(args, "sender", None)
    recipient = getattr(args, "recipient", None)
    older = getattr(args, "older_than", None)
    out = []
    for m in messages:
        if states and m["state"] not in states:
            continue
        if sender is not None and not _matches(sender, m["sender"] or "MAILER-DAEMON"):
            continue
        if recipient is not None and not any(_matches(recipient, r.get("addr") or "") or
                                             _matches(recipient, r.get("orig") or "") for r in m["recipients"]):
            continue
        if older is not None and not (m["arrival"] and now - m["arrival"] > older):
            continue
        out.append(m)
    return out


# --- commands ---------------------------------------------------------------------------------------------
def _collect_any(cfg) -> list[dict]:
    """The queue from the files; a user who may not read them asks the running server (mailq is for
    everyone, as Postfix's default authorized_mailq_users)."""
    try:
        return collect(Spool(cfg.queue_dir))
    except PermissionError as e:
        from . import pickup
        try:
            resp = pickup.request(cfg, {"action": "list"})
        except pickup.PickupError as pe:
            raise control.ControlError(str(pe)) from None
        if resp is None or not resp.get("ok"):
            raise control.ControlError(f"{e.filename}: {e.strerror}, and the server is not running to ask") from None
        return resp["messages"]


def cmd_list(args, cfg) -> int:
    messages = filter_messages(_collect_any(cfg), args)
    if getattr(args, "json", False):
        print(json.dumps(messages, indent=1, ensure_ascii=False))
    else:
        sys.stdout.write(format_mailq(messages))
    return 0


def cmd_show(args, cfg) -> int:
    resp = control.request(cfg, {"action": "show", "id": args.id})
    if resp is None:
        info = show_from_files(Spool(cfg.queue_dir), args.id) if valid_qid(args.id) else None
        if info is None:
            print(f"mailstack queue: {args.id}: no such message in the queue", file=sys.stderr)
            return 1
    elif not resp.get("ok"):
        print(f"mailstack queue: {resp.get('error')}", file=sys.stderr)
        return 1
    else:
        info = resp["message"]
    if args.json:
        print(json.dumps(info, indent=1, ensure_ascii=False))
    else:
        sys.stdout.write(format_show(info))
    return 0


def cmd_cat(args, cfg) -> int:
    """postcat -q: the queue file as a person reads it."""
    spool = Spool(cfg.queue_dir)
    try:
        os.listdir(spool.dir)  # a queue we may not read must not look like "no such message"
    except FileNotFoundError:
        pass
    state = spool.locate(args.id, QUEUE_STATES + ("maildrop", "corrupt")) if valid_qid(args.id) else None
    if state is None:
        print(f"mailstack queue: {args.id}: no such message in the queue", file=sys.stderr)
        return 1
    path = spool.path(state, args.id)
    try:
        msg = read_envelope(path, args.id)
        data = Spool.read_message(msg.source)
    except FileNotFoundError:
        print(f"mailstack queue: {args.id}: no longer in the queue", file=sys.stderr)
        return 1
    except CorruptQueueFile as e:
        print(f"mailstack queue: {e}", file=sys.stderr)
        return 1
    end = data.find(b"\r\n\r\n")
    headers, body = (data, b"") if end < 0 else (data[:end + 2], data[end + 4:])
    out = sys.stdout.buffer
    if args.headers_only:
        out.write(headers)
    elif args.body_only:
        out.write(body)
    else:
        lines = [f"*** ENVELOPE RECORDS {state}/{args.id} ***",
                 f"message_size: {msg.source.size}",
                 f"arrival_time: {time.strftime('%a %b %d %H:%M:%S %Y', time.localtime(msg.arrival))}",
                 f"sender: {msg.sender}"]
        lines += [f"recipient: {r}" for r in msg.recipients]
        lines += [f"meta: {k}={v}" for k, v in sorted((msg.meta or {}).items())]
        out.write(("\n".join(lines) + "\n").encode("utf-8", "replace"))
        if not args.envelope_only:
            out.write(f"*** MESSAGE CONTENTS {state}/{args.id} ***\n".encode())
            out.write(data if data.endswith(b"\n") else data + b"\n")
            out.write(f"*** MESSAGE FILE END {state}/{args.id} ***\n".encode())
    out.flush()
    return 0


def _waiting_for(spool: Spool, qid: str, domain: str) -> bool:
    """Blocking: has this deferred message a recipient waiting for `domain`?"""
    status = spool.read_status(qid) or {}
    addrs = [t.get("addr", "") for t in status.get("targets") or [] if isinstance(t, dict)
             and t.get("status") in ("pending", "deferred")]
    if not addrs:
        try:
            addrs = read_envelope(spool.path("deferred", qid), qid).recipients
        except (OSError, CorruptQueueFile):
            return False
    return any(a.rpartition("@")[2].lower().rstrip(".") == domain for a in addrs)


def deferred_for_domain(spool: Spool, domain: str) -> list[str]:
    return [qid for qid in spool.ids("deferred") if _waiting_for(spool, qid, domain)]


def cmd_flush(args, cfg) -> int:
    req = {"action": "flush"}
    if args.domain:
        from ..directory import normalize_domain
        req["domain"] = normalize_domain(args.domain)
    resp = control.request(cfg, req)
    if resp is None:
        print("mailstack queue: the server is not running; deferred mail is tried when it starts",
              file=sys.stderr)
        return 1
    if not resp.get("ok"):
        print(f"mailstack queue: {resp.get('error')}", file=sys.stderr)
        return 1
    where = f" for {req['domain']}" if args.domain else ""
    print(f"flushed: {resp.get('flushed', 0)} deferred message(s){where} scheduled now")
    return 0


def parse_targets(action: str, words: list[str]) -> tuple[list[str] | None, tuple[str, ...]]:
    """`ID...` -> (ids, ()); `ALL [STATE...]` -> (None, states). UsageError for anything else,
    before anything is touched (postsuper: "fatal: invalid directory name")."""
    allowed = ALL_STATES[action]
    if words and words[0] == "ALL":
        bad = [w for w in words[1:] if w not in allowed]
        if bad:
            raise UsageError(f"{bad[0]!r} is not a queue state for {action} (one of {', '.join(allowed)}); "
                             "nothing was changed")
        return None, tuple(dict.fromkeys(words[1:])) or allowed
    bad = [w for w in words if not valid_qid(w)]
    if bad:
        hint = " (write ALL in upper case)" if any(w.upper() == "ALL" for w in bad) else ""
        raise UsageError(f"{bad[0]!r} is not a queue id{hint}; nothing was changed")
    return list(dict.fromkeys(words)), ()


def cmd_change(args, cfg, action: str) -> int:
    """delete / hold / release / requeue, through the server when it runs, else on the files."""
    spool = Spool(cfg.queue_dir)
    ids, states = parse_targets(action, args.ids)
    if ids is None:
        if action == "delete" and states == QUEUE_STATES:
            ids = ["ALL"]  # the manager also removes what it holds in memory only
        else:
            ids = [qid for _, qid in spool.entries(states)]
            if not ids:
                print(f"no message in {', '.join(states)}")
                return 0
    code = 0
    for qid in ids:
        resp = control.request(cfg, {"action": action, "id": qid})
        if resp is None:
            resp = offline_change(spool, action, qid)
        if not resp.get("ok"):
            print(f"mailstack queue: {resp.get('error')}", file=sys.stderr)
            code = 1
            continue
        if resp.get("message"):
            print(resp["message"])
        elif qid == "ALL":
            print(f"{resp.get('deleted', 0)} message(s) deleted")
        else:
            print(f"{qid}: {_PAST[action]}")
    return code


_PAST = {"delete": "deleted", "hold": "held", "release": "released", "requeue": "requeued"}


def offline_change(spool: Spool, action: str, qid: str) -> dict:
    """The server is not running: act on the files (renames and unlinks)."""
    if action == "delete":
        if qid == "ALL":
            n = 0
            for state, q in list(spool.entries()):
                spool.remove(q, state)
                n += 1
            return {"ok": True, "deleted": n}
        state = spool.locate(qid)
        if state is None:
            return {"ok": False, "error": f"{qid}: no such message in the queue"}
        spool.remove(qid, state)
        return {"ok": True}
    if action == "hold":
        state = spool.locate(qid)
        if state is None:
            return {"ok": False, "error": f"{qid}: no such message in the queue"}
        if state == "hold":
            return {"ok": True, "message": f"{qid}: already on hold"}
        spool.move(qid, state, "hold", sync=True)
        return {"ok": True}
    if action == "release":
        if spool.locate(qid, ("hold",)) is None:
            return {"ok": False, "error": f"{qid}: not on hold"}
        # active/ is taken up first thing when the server starts
        spool.move(qid, "hold", "active", sync=True)
        return {"ok": True}
    if action == "requeue":
        from .manager import requeue_files

        state = spool.locate(qid)
        if state is None:
            return {"ok": False, "error": f"{qid}: no such message in the queue"}
        requeue_files(spool, qid, state)  # incoming/: taken up first thing when the server starts
        return {"ok": True}
    return {"ok": False, "error": f"unknown action {action}"}
