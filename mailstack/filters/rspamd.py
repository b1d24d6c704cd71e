"""rspamd over its HTTP protocol (POST /checkv2 to the normal worker; /learnspam and
/learnham to the controller).  https://rspamd.com/doc/developers/protocol.html

The answer's action decides: reject -> 554 at the end of DATA; soft reject and greylist
-> 451; rewrite subject and add header -> spam (the Junk folder), with the subject
rewritten as rspamd says; no action -> accepted.  The score and symbols go into
X-Spamd-Result / X-Spam-Status / X-Rspamd-Action headers, as rspamd's own milter adds
them; a DKIM signature rspamd made (its dkim_signing module) and headers its
milter_headers module asks for are added too.
"""
from __future__ import annotations

import json
import logging

from ..smtp.hooks import Connection, Transaction, Verdict
from . import http
from .base import FilterUnavailable, LearnRefused, fold, replace_subject

log = logging.getLogger("mailstack.filters")

SPAM_ACTIONS = ("add header", "rewrite subject")


class Rspamd:
    name = "rspamd"

    def __init__(self, url: str, controller_url: str, password: str, timeout: float) -> None:
        self.host, self.port, self.base = http.parse_url(url)
        self.controller = http.parse_url(controller_url) if controller_url else None
        self.password = password
        self.timeout = timeout

    async def scan(self, conn: Connection, txn: Transaction, message: bytes) -> Verdict:
        headers = [("IP", conn.ip), ("From", txn.mail_from), ("Helo", conn.helo or ""),
                   ("MTA-Name", conn.hostname), ("Queue-Id", txn.qid or "")]
        headers += [("Rcpt", r) for r in txn.rcpts]
        if conn.rdns:
            headers.append(("Hostname", conn.rdns))
        if conn.auth_user:
            headers.append(("User", conn.auth_user))
        status, _, body = await http.post(self.host, self.port, self.base + "/checkv2", headers, message,
                                          self.timeout)
        if status != 200:
            raise FilterUnavailable(f"rspamd answered HTTP {status}")
        try:
            result = json.loads(body)
            action = str(result["action"])
            score, required = float(result.get("score", 0)), float(result.get("required_score", 0))
        except (ValueError, KeyError, TypeError):
            raise FilterUnavailable("rspamd's answer is not the /checkv2 JSON") from None
        return verdict_for(result, action, score, required, message)

    async def learn(self, kind: str, message: bytes) -> None:
        """POST /learnspam or /learnham to the controller; FilterUnavailable if not learned."""
        if self.controller is None:
            raise FilterUnavailable("filters.rspamd_controller is not set")
        host, port, base = self.controller
        headers = [("Password", self.password)] if self.password else []
        status, _, body = await http.post(host, port, f"{base}/learn{kind}", headers, message, self.timeout)
        if status in (200, 208):  # learned, or already learned
            return
        if 200 <= status < 300 or status == 400:  # 204: "learn conditions denied", too few tokens, ...
            raise LearnRefused(f"rspamd /learn{kind} answered HTTP {status}: {body[:200]!r}")
        if status != 200:
            raise FilterUnavailable(f"rspamd /learn{kind} answered HTTP {status}: {body[:200]!r}")


def verdict_for(result: dict, action: str, score: float, required: float, message: bytes) -> Verdict:
    """rspamd's /checkv2 answer -> Verdict (pure)."""
    v = Verdict()
    v.log["rspamd"] = f"{score:.2f}/{action}"
    smtp_message = ""
    if isinstance(result.get("messages"), dict):
        smtp_message = str(result["messages"].get("smtp_message", "")).replace("\r", " ").replace("\n", " ")
    if action == "reject":
        v.reply = f"554 5.7.1 {smtp_message or 'Spam message rejected'}"
        v.meta["spam"] = {"score": score, "threshold": required, "is_spam": True}
        return v
    if action == "soft reject":
        v.reply = f"451 4.7.1 {smtp_message or 'Try again later'}"
        return v
    if action == "greylist":
        v.reply = f"451 4.7.1 {smtp_message or 'Greylisted, please try again later'}"
        return v
    is_spam = action in SPAM_ACTIONS
    symbols = result.get("symbols") if isinstance(result.get("symbols"), dict) else {}
    items = [f"default: {is_spam} [{score:.2f} / {required:.2f}]"]
    for name in sorted(symbols):
        sym = symbols[name] if isinstance(symbols[name], dict) else {}
        text = f"{name}({float(sym.get('score', 0)):.2f})"
        options = sym.get("options")
        if isinstance(options, list) and options:
            text += "[" + ",".join(str(o) for o in options[:5]) + "]"
        items.append(text)
    v.headers.append(("X-Spamd-Result", fold("X-Spamd-Result", items)))
    v.headers.append(("X-Rspamd-Action", action))
    v.headers.append(("X-Spam-Status", f"{'Yes' if is_spam else 'No'}, score={score:.2f} required={required:.2f}"))
    if is_spam:
        v.headers.append(("X-Spam", "Yes"))
        v.meta["junk"] = f"rspamd: {action} (score {score:.2f})"
    v.meta["spam"] = {"score": score, "threshold": required, "is_spam": is_spam}
    if action == "rewrite subject" and isinstance(result.get("subject"), str):
        v.message = replace_subject(message, result["subject"])
    signature = result.get("dkim-signature")
    if isinstance(signature, str) and signature:
        v.headers.insert(0, ("DKIM-Signature", signature.partition(":")[2].strip()
                             if signature.lower().startswith("dkim-signature:") else signature))
    milter = result.get("milter") if isinstance(result.get("milter"), dict) else {}
    for name, value in (milter.get("add_headers") or {}).items():
        if isinstance(value, dict):
            value = value.get("value", "")
        if isinstance(value, str) and name.lower() not in {h[0].lower() for h in v.headers}:
            v.headers.append((name, value))
    return v
