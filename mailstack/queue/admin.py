"""`mailstack queue list|show|delete|hold|release|flush`, `mailstack mailq`, `mailstack sendmail`.

Listing reads the spool directories directly, so it works whether the server runs
or not.  Actions go through the control socket when a server runs (they take
effect at once and are safe against a delivery in progress); when none runs they
are renames and unlinks of the queue files.
"""
from __future__ import annotations

import json
import sys
import time

from . import control
from .spool import QUEUE_STATES, CorruptQueueFile, Spool, read_envelope, valid_qid

_MARK = {"active": "*", "incoming": "*", "hold": "!", "maildrop": "+"}


def add_commands(sub) -> None:
    q = sub.add_parser("queue", help="the mail queue: list, show, delete, hold, release, flush",
                       description="Act on the mail queue. Actions reach a running server through its "
                                   "control socket; without one they act on the queue files.")
    qsub = q.add_subparsers(dest="queue_action", metavar="ACTION")
    qsub.required = True
    p = qsub.add_parser("list", help="every queued message (like Postfix's mailq)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    p = qsub.add_parser("show", help="envelope and per-recipient delivery history of one message")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p = qsub.add_parser("delete", help="delete messages (ALL = the whole queue); no bounce is sent")
    p.add_argument("ids", nargs="+", metavar="ID|ALL")
    p = qsub.add_parser("hold", help="put messages on hold: not delivered until released")
    p.add_argument("ids", nargs="+", metavar="ID|ALL")
    p = qsub.add_parser("release", help="release held messages and try them at once")
    p.add_argument("ids", nargs="+", metavar="ID|ALL")
    qsub.add_parser("flush", help="try every deferred message now (server must be running)")
    q.set_defaults(func=run)

    m = sub.add_parser("mailq", help="same as `queue list`")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=run, queue_action="list")

    from .maildrop import add_parser

    add_parser(sub)


def run(args, cfg) -> int:
    action = args.queue_action
    try:
        if action == "list":
            return cmd_list(args, cfg)
        if action == "show":
            return cmd_show(args, cfg)
        if action == "flush":
            return cmd_flush(args, cfg)
        return cmd_change(args, cfg, action)
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


# --- commands ---------------------------------------------------------------------------------------------
def cmd_list(args, cfg) -> int:
    messages = collect(Spool(cfg.queue_dir))
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


def cmd_flush(args, cfg) -> int:
    resp = control.request(cfg, {"action": "flush"})
    if resp is None:
        print("mailstack queue: the server is not running; deferred mail is tried when it starts",
              file=sys.stderr)
        return 1
    if not resp.get("ok"):
        print(f"mailstack queue: {resp.get('error')}", file=sys.stderr)
        return 1
    print(f"flushed: {resp.get('flushed', 0)} deferred message(s) scheduled now")
    return 0


def cmd_change(args, cfg, action: str) -> int:
    """delete / hold / release, through the server when it runs, else on the files."""
    spool = Spool(cfg.queue_dir)
    ids = args.ids
    if any(i.upper() == "ALL" for i in ids):
        if action == "delete":
            ids = ["ALL"]
        else:
            states = ("hold",) if action == "release" else ("incoming", "active", "deferred")
            ids = [qid for _, qid in spool.entries(states)]
    code = 0
    for qid in ids:
        if qid != "ALL" and not valid_qid(qid):
            print(f"mailstack queue: {qid}: not a queue id", file=sys.stderr)
            code = 1
            continue
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


_PAST = {"delete": "deleted", "hold": "held", "release": "released"}


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
    return {"ok": False, "error": f"unknown action {action}"}
