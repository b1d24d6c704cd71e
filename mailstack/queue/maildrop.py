"""`mailstack sendmail` (also installed as `sendmail`): the sendmail(8) interface for local
programs (cron, mail(1), PHP, git ...).

Root and the server's own user write like Postfix's postdrop: the message goes durably into
queue_dir/maildrop/ (a complete queue file: envelope + message, written to a dot-name,
fsynced, renamed, directory fsynced) and a running server is asked to pick it up at once;
when no server runs, the file waits for the next start.  Every other local user cannot
write there: their message goes to the running server over its public socket (pickup.py),
which knows them by their peer credentials.  -bs speaks SMTP on stdin/stdout, -bv says how
addresses would be delivered, -bp lists the queue.
"""
from __future__ import annotations

import email.parser
import email.policy
import os
import pwd
import re
import sys
import time
from email.utils import formatdate, getaddresses

from ..fsutil import fsync_dir
from .spool import encode_header, new_id, write_queue_file

EX_USAGE, EX_DATAERR, EX_NOUSER, EX_SOFTWARE, EX_CANTCREAT, EX_TEMPFAIL, EX_NOPERM = 64, 65, 67, 70, 73, 75, 77
MAX_ADDRESS = 320
_FIELD_RE = re.compile(rb"[!-9;-~]+[ \t]*:")  # RFC 5322 field name (printable, no colon)


class SendmailError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def add_parser(sub) -> None:
    p = sub.add_parser("sendmail", help="queue a message read from stdin (sendmail compatible)",
                       description="Read a message on stdin and queue it, like sendmail(8). Recipients "
                                   "come from the arguments (and, with -t, from To/Cc/Bcc).")
    p.add_argument("-t", dest="extract", action="store_true", help="take recipients from To:, Cc: and Bcc: "
                   "(in addition to any on the command line); Bcc: is removed")
    p.add_argument("-i", dest="ignore_dots", action="store_true",
                   help="a line with a single dot does not end the message")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT",
                   help="sendmail option; -oi is the same as -i, others are ignored")
    p.add_argument("-f", "-r", dest="sender", metavar="SENDER", help="envelope sender (<> for the null sender)")
    p.add_argument("-F", dest="fullname", metavar="NAME", help="full name for a From: header that is added")
    p.add_argument("-b", dest="mode", default="m", metavar="MODE",
                   help="-bm (default) delivers mail; -bp lists the queue (as mailq); -bs speaks SMTP on "
                        "stdin/stdout; -bv verifies the recipients and says how each would be delivered; "
                        "-bi (newaliases) does nothing")
    p.add_argument("-B", dest="body_type", metavar="TYPE", help="ignored (7BIT / 8BITMIME)")
    p.add_argument("-N", dest="dsn_notify", metavar="DSN", help="ignored")
    p.add_argument("-v", dest="verbose", action="store_true", help="ignored")
    p.add_argument("recipients", nargs="*", metavar="RECIPIENT", help="envelope recipients; a bare name is a local user of this host")
    p.set_defaults(func=run_sendmail)


def run_sendmail(args, cfg) -> int:
    if args.mode == "p":
        from .admin import cmd_list

        args.json = False
        return cmd_list(args, cfg)
    if args.mode == "i":
        return newaliases(cfg)
    try:
        if args.mode == "v":
            return verify(cfg, args)
        if args.mode == "s":
            from .smtpstdio import serve_stdio
            return serve_stdio(cfg, sys.stdin.buffer, sys.stdout.buffer)
        if args.mode != "m":
            raise SendmailError(f"-b{args.mode} is not supported (-bm, -bp, -bs, -bv, -bi)", EX_USAGE)
        qid = sendmail(cfg, sys.stdin.buffer, args)
    except SendmailError as e:
        print(f"mailstack sendmail: {e}", file=sys.stderr)
        return e.code
    if getattr(args, "verbose", False):
        print(f"queued as {qid}", file=sys.stderr)
    return 0


def read_message(stream, limit: int, ignore_dots: bool) -> bytes:
    """Read stdin, bounded; without -i a line holding only "." ends the message (as sendmail)."""
    data = stream.read(limit + 1)
    if not ignore_dots:
        pieces = data.split(b"\n")
        for i, piece in enumerate(pieces):
            if piece.rstrip(b"\r") == b".":
                data = b"\n".join(pieces[:i]) + (b"\n" if i else b"")
                break
    if len(data) > limit:
        raise SendmailError(f"message too large (more than {limit} bytes)", EX_DATAERR)
    return data


def to_crlf(data: bytes) -> bytes:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join(line.rstrip(b"\r") + b"\r\n" for line in lines)


def split_headers(msg: bytes) -> tuple[list[bytes], bytes]:
    """-> (header lines, each with CRLF and continuation lines joined to their field; body incl. the
    blank line). A message with no blank line and no header-looking first line is all body."""
    fields: list[bytes] = []
    pos = 0
    while pos < len(msg):
        end = msg.find(b"\r\n", pos)
        end = len(msg) if end < 0 else end + 2
        line = msg[pos:end]
        if line in (b"\r\n", b""):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _FIELD_RE.match(line):
            fields.append(line)
        else:
            break  # not a header: the body starts here (no blank line in between)
        pos = end
    return fields, msg[pos:]


def _field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def newaliases(cfg) -> int:
    where = f"{cfg.data_dir / 'aliases'}" if cfg is not None else "the data directory's aliases file"
    print(f"newaliases: nothing to do: mailstack reads its aliases from {where} as they change "
          "(edit them with `mailstack alias`)")
    return 0


def verify(cfg, args) -> int:
    """-bv: how each recipient would be delivered; exit 0 when all are deliverable (as sendmail)."""
    from . import pickup
    if not args.recipients:
        raise SendmailError("-bv needs one or more addresses", EX_USAGE)
    try:
        resp = pickup.request(cfg, {"action": "verify", "addresses": args.recipients})
    except pickup.PickupError as e:
        raise SendmailError(str(e), EX_TEMPFAIL) from None
    if resp is None:  # no server: read the directory ourselves (needs the right to)
        from ..directory import Directory
        try:
            directory = Directory.for_config(cfg)
        except PermissionError as e:
            raise SendmailError(f"{e.filename}: {e.strerror} and the server is not running", EX_NOPERM) from None
        results = [pickup.describe(directory, cfg, a) for a in args.recipients]
    elif not resp.get("ok"):
        raise SendmailError(resp.get("error", "verify failed"), EX_SOFTWARE)
    else:
        results = resp["results"]
    for r in results:
        print(f"{r['address']}: {'deliverable' if r['deliverable'] else 'undeliverable'}: {r['route']}")
    return 0 if all(r["deliverable"] for r in results) else EX_NOUSER


def check_address(addr: str, hostname: str) -> str:
    addr = addr.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1].strip()
    if not addr or len(addr) > MAX_ADDRESS or any(c.isspace() or ord(c) < 32 or c in "<>()," for c in addr):
        raise SendmailError(f"bad address {addr!r}", EX_DATAERR if addr else EX_USAGE)
    if "@" not in addr:
        addr = f"{addr}@{hostname}"  # bare user names are local to this host, as in Postfix
    return addr


_check_address = check_address


def sendmail(cfg, stream, args, now: float | None = None) -> str:
    """Build and drop the queue file; returns its queue id."""
    now = time.time() if now is None else now
    hostname = cfg.server.hostname
    ignore_dots = args.ignore_dots or "i" in (args.options or [])
    raw = read_message(stream, cfg.smtp.max_message_size, ignore_dots)
    msg = to_crlf(raw)
    fields, body = split_headers(msg)
    if not body.startswith(b"\r\n"):
        body = b"\r\n" + body

    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    if args.sender is not None:
        sender = args.sender.strip()
        sender = "" if sender in ("<>", "") else _check_address(sender, hostname)
    else:
        sender = f"{user}@{hostname}"

    recipients = [_check_address(r, hostname) for arg in args.recipients for r in arg.split(",") if r.strip()]
    if args.extract:
        parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(b"".join(fields) + b"\r\n")
        values = [str(v) for name in ("To", "Cc", "Bcc") for v in parsed.get_all(name, [])]
        for _, addr in getaddresses(values):
            if addr:
                recipients.append(_check_address(addr, hostname))
        fields = [f for f in fields if _field_name(f) not in ("bcc", "resent-bcc")]
    # Only final delivery writes a Return-Path (RFC 5321 4.4); one in the input is dropped,
    # as Postfix's cleanup does, and as the SMTP listeners do (smtp/cleanup.py).
    fields = [f for f in fields if _field_name(f) != "return-path"]
    recipients = list(dict.fromkeys(recipients))
    if not recipients:
        raise SendmailError("no recipients (give them as arguments, or use -t)", EX_USAGE)
    if len(recipients) > cfg.smtp.max_recipients:
        raise SendmailError(f"too many recipients (at most {cfg.smtp.max_recipients})", EX_DATAERR)

    qid = new_id()
    names = {_field_name(f) for f in fields}
    received = (f"Received: by {hostname} (mailstack, from userid {uid})\r\n\tid {qid}; "
                f"{formatdate(now, localtime=True)}\r\n").encode()
    extra = []
    if "from" not in names:
        name = args.fullname
        if name is None:
            try:
                name = pwd.getpwuid(uid).pw_gecos.split(",")[0] if args.sender is None else ""
            except KeyError:
                name = ""
        shown = sender or f"MAILER-DAEMON@{hostname}"
        if name:
            quoted = name.replace("\\", "\\\\").replace('"', '\\"')
            extra.append(f'From: "{quoted}" <{shown}>\r\n'.encode())
        else:
            extra.append(f"From: {shown}\r\n".encode())
    if "date" not in names:
        extra.append(f"Date: {formatdate(now, localtime=True)}\r\n".encode())
    if "message-id" not in names:
        extra.append(f"Message-ID: <{qid}.{int(now)}@{hostname}>\r\n".encode())
    content = b"".join(fields + extra) + body
    return submit(cfg, sender if args.sender is not None else None, recipients, content, qid=qid,
                  received=received, now=now)


def submit(cfg, sender: str | None, recipients: list[str], content: bytes, qid: str | None = None,
           received: bytes | None = None, now: float | None = None) -> str:
    """Queue `content` (headers complete, no Received: yet) for `recipients`. sender None = the
    user's own address. Root and the server's user drop into the maildrop (works with the
    server stopped); anyone else goes through the running server's public socket."""
    now = time.time() if now is None else now
    hostname = cfg.server.hostname
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    qid = qid or new_id()
    if received is None:
        received = (f"Received: by {hostname} (mailstack, from userid {uid})\r\n\tid {qid}; "
                    f"{formatdate(now, localtime=True)}\r\n").encode()
    message = received + content
    if len(message) > cfg.smtp.max_message_size:
        raise SendmailError(f"message too large (more than {cfg.smtp.max_message_size} bytes)", EX_DATAERR)
    envelope_sender = f"{user}@{hostname}" if sender is None else sender
    meta = {"listener": "sendmail", "uid": uid, "user": user,
            "body": "7BIT" if message.isascii() else "8BITMIME"}
    if not all(a.isascii() for a in recipients + [envelope_sender]):
        meta["smtputf8"] = True
    header = encode_header(envelope_sender, recipients, now, len(message), meta)
    try:
        drop_file(cfg, qid, header, message)
    except SendmailError as e:
        if e.code != EX_NOPERM:
            raise
        return _submit_to_server(cfg, sender, recipients, content, e)

    try:
        from . import control

        control.request(cfg, {"action": "pickup"}, timeout=5)
    except Exception:
        pass  # not running, or busy: the server scans the maildrop on start and every few seconds
    return qid


def _submit_to_server(cfg, sender, recipients, content: bytes, cause: SendmailError) -> str:
    from . import pickup
    try:
        resp = pickup.request(cfg, {"action": "submit", "sender": sender, "recipients": recipients,
                                    "size": len(content)}, content)
    except pickup.PickupError as e:
        raise SendmailError(str(e), EX_TEMPFAIL) from None
    if resp is None:
        raise SendmailError(f"{cause} and the mail server is not running to take the message", EX_TEMPFAIL)
    if not resp.get("ok"):
        raise SendmailError(resp.get("error", "refused"), int(resp.get("code") or EX_SOFTWARE))
    return resp["qid"]


def drop_file(cfg, qid: str, header: bytes, message: bytes) -> None:
    queue_dir = cfg.queue_dir
    maildrop = queue_dir / "maildrop"
    owner = None
    try:
        queue_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        maildrop.mkdir(exist_ok=True, mode=0o700)
        st = os.stat(queue_dir)
        if os.geteuid() == 0 and st.st_uid != 0:
            # root dropping mail for a server that runs as its own user: hand the file over
            owner = (st.st_uid, st.st_gid)
            if os.stat(maildrop).st_uid != st.st_uid:
                os.chown(maildrop, st.st_uid, st.st_gid)
        tmp = maildrop / f".{qid}.tmp"
        write_queue_file(tmp, header, [message], owner=owner)
        os.rename(tmp, maildrop / qid)
        fsync_dir(maildrop)
    except PermissionError as e:
        raise SendmailError(f"cannot write to {maildrop}: {e.strerror} (run as the mail server's user "
                            "or root)", EX_NOPERM) from None
    except OSError as e:
        raise SendmailError(f"cannot queue the message: {e.strerror or e}", EX_TEMPFAIL) from None
