"""SpamAssassin's spamd, through aiospamc (SPAMC/SPAMD protocol 1.5).

REPORT gives the verdict (Spam: True ; score / required) and the report text, which
becomes X-Spam-Report; spam below `spamd_reject_score` goes to the Junk folder with
X-Spam-Flag / X-Spam-Status / X-Spam-Score, the headers SpamAssassin itself adds.
TELL (spamd started with --allow-tell) learns spam and ham.
"""
from __future__ import annotations

import aiospamc
from aiospamc.exceptions import ClientException, ParseError, TimeoutException
from aiospamc.responses import ResponseException

from ..smtp.hooks import Connection, Transaction, Verdict
from .base import FilterUnavailable

# Any of these means "no verdict" (the chain applies the default action).
ERRORS = (ClientException, ResponseException, TimeoutException, ParseError, OSError)
MAX_REPORT_LINES = 40


class Spamd:
    name = "spamd"

    def __init__(self, host: str, port: int, socket_path: str, timeout: float, reject_score: float,
                 user: str) -> None:
        self.where = {"socket_path": socket_path} if socket_path else {"host": host, "port": port}
        self.timeout = timeout
        self.reject_score = reject_score
        self.user = user or None

    def _timeout(self) -> aiospamc.Timeout:
        return aiospamc.Timeout(total=self.timeout, connection=min(self.timeout, 10.0), response=self.timeout)

    async def scan(self, conn: Connection, txn: Transaction, message: bytes) -> Verdict:
        try:
            response = await aiospamc.report(message, **self.where, timeout=self._timeout(), user=self.user)
            spam = response.headers["Spam"]
            is_spam, score, required = bool(spam.value), float(spam.score), float(spam.threshold)
        except ERRORS as e:
            raise FilterUnavailable(f"spamd: {type(e).__name__}: {e}") from None
        except (KeyError, AttributeError, TypeError, ValueError):
            raise FilterUnavailable("spamd's answer has no Spam header") from None
        report = bytes(response.body or b"").decode("utf-8", "replace")
        return verdict_for(is_spam, score, required, report, self.reject_score)

    async def learn(self, kind: str, message: bytes) -> None:
        try:
            await aiospamc.tell(message, kind, set_action="local", **self.where, timeout=self._timeout(),
                                user=self.user)
        except ERRORS as e:
            raise FilterUnavailable(f"spamd TELL: {type(e).__name__}: {e}") from None


def verdict_for(is_spam: bool, score: float, required: float, report: str, reject_score: float) -> Verdict:
    v = Verdict()
    v.log["spamd"] = f"{score:.1f}/{required:.1f}"
    v.meta["spam"] = {"score": score, "threshold": required, "is_spam": is_spam}
    if reject_score and score >= reject_score:
        v.reply = f"554 5.7.1 Spam message rejected (score {score:.1f})"
        return v
    v.headers.append(("X-Spam-Flag", "YES" if is_spam else "NO"))
    v.headers.append(("X-Spam-Score", f"{score:.1f}"))
    v.headers.append(("X-Spam-Status", f"{'Yes' if is_spam else 'No'}, score={score:.1f} required={required:.1f}"))
    lines = [line.rstrip() for line in report.replace("\r\n", "\n").split("\n") if line.strip()]
    # SpamAssassin's own X-Spam-Report is the analysis table, without the preamble for people.
    start = next((i for i, line in enumerate(lines) if line.startswith("Content analysis details")), 0)
    lines = lines[start:]
    if lines:
        v.headers.append(("X-Spam-Report", "\n\t".join(lines[:MAX_REPORT_LINES])))
    if is_spam:
        v.meta["junk"] = f"spamd: score {score:.1f} >= {required:.1f}"
    return v
