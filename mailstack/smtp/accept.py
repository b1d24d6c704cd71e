"""SMTP in: what becomes of a message once its DATA is in (a mixin of smtp/server.py's
session).

The configured stages judge it (hooks.py: refuse, discard, hold, add headers, change the
envelope); then it is made durable before the "250": delivered into the local Maildirs at
once when it can be (queue/direct.py), else written to the queue (queue/spool.py).  One
log line per message, as Postfix's cleanup/qmgr pair would write it.
"""
from __future__ import annotations

import asyncio
import logging
import time

from .. import metrics
from ..queue import direct
from . import cleanup, hooks
from .data import DataReader

log = logging.getLogger("mailstack.smtp")


class AcceptMixin:
    """Needs the session's services, cfg, conn, txn, stages, mail_from, rcpts, helo,
    esmtp, tls, tls_info, auth_user, hostname, listener, client, busy, reply()."""

    def _refuse_data(self, reader: DataReader) -> None:
        reply = {
            "size": "552 5.3.4 Error: message size exceeds fixed limit",
            "line": f"500 5.5.2 Error: message line longer than {self.cfg.smtp.max_line_length} bytes",
            "bare": "550 5.6.0 Message contains bare LF or CR",
            "resources": "451 4.3.1 Insufficient system resources, try again later",
        }[reader.error]
        log.info("reject: DATA from=<%s>, size=%d, nrcpt=%d: %s", self.mail_from, reader.received,
                 len(self.rcpts), reply, extra={"client": self.client})
        self.services.metrics.smtp_rejected[metrics.DATA_REJECT_REASONS[reader.error]] += 1
        self.reply(reply)

    async def _enqueue(self, reader: DataReader) -> None:
        spool = self.services.spool
        new_id = getattr(spool, "new_id", None)
        qid = new_id() if new_id is not None else None
        now = time.time()
        rdns = self._rdns_name
        if self._rdns is not None and self._rdns.done() and not self._rdns.cancelled():
            rdns = self._rdns.result()
        chunks, sender, rcpts = reader.chunks, self.mail_from, list(self.rcpts)
        meta = {"client_ip": self.client, "client_helo": self.helo, "auth_user": self.auth_user,
                "listener": self.listener, "smtputf8": self.smtputf8, "body": self.body, "received_at": now}
        verdict = None
        if self.txn is not None:  # configured checks see the message before anything is said
            self.conn.rdns = rdns
            self.txn.qid = qid
            self.busy = self.storing = True
            try:
                verdict, message = await hooks.judge(self.stages, self.conn, self.txn, b"".join(chunks))
            finally:
                self.busy = False
            if verdict.reply:
                log.info("reject: DATA from=<%s>, nrcpt=%d: %s%s", sender, len(rcpts), verdict.reply,
                         _log_fields(verdict.log), extra={"client": self.client})
                self.services.metrics.smtp_reject(verdict.reply)
                return self.reply(verdict.reply)
            if verdict.discard:
                log.info("discard: from=<%s>, nrcpt=%d%s", sender, len(rcpts), _log_fields(verdict.log),
                         extra={"qid": qid, "client": self.client})
                return self.reply(f"250 2.0.0 Ok: queued as {qid}")
            chunks = [hooks.header_lines(verdict.headers), message] if verdict.headers else [message]
            sender = verdict.sender if verdict.sender is not None else sender
            gone = {r.lower() for r in verdict.del_rcpts}
            rcpts = [r for r in rcpts if r.lower() not in gone] + verdict.add_rcpts
            meta.update(verdict.meta)
            if not rcpts:
                log.info("discard: from=<%s>: no recipients left%s", sender, _log_fields(verdict.log),
                         extra={"qid": qid, "client": self.client})
                return self.reply(f"250 2.0.0 Ok: queued as {qid}")
        header = cleanup.received_header(
            helo=self.helo or "unknown", rdns=rdns, ip=self.client, hostname=self.hostname,
            protocol=cleanup.protocol_name(self.esmtp, self.tls, self.auth_user is not None),
            qid=qid, tls=self.tls_info, when=now)
        head = cleanup.header_block(chunks)
        chunks = cleanup.without_return_path(chunks, head)
        if self.auth_user is not None:
            header += cleanup.submission_fields(head, self.hostname, now)
        kwargs = {"qid": qid} if qid is not None else {}
        if verdict is not None and verdict.hold:  # quarantined: written straight into hold/
            kwargs["state"] = "hold"
            meta["hold_reason"] = verdict.hold
        size = len(header) + sum(len(c) for c in chunks)
        # A client that hangs up now must not cut a queue file short: while `storing`,
        # connection_lost does not cancel this task (server.py).  Awaited in this task, not
        # in one of its own behind asyncio.shield: that cost two loop cycles a message.
        self.busy = self.storing = True
        try:
            qid = await self._store_or_queue(spool, sender, rcpts, [header, *chunks], meta, kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error("enqueue failed: from=<%s>: %s", sender, e, extra={"client": self.client})
            self.reply("451 4.3.0 Error: queue file write error, try again later")
            return
        finally:
            self.busy = self.storing = False
        reader.chunks = []
        log.info("from=<%s>, size=%d, nrcpt=%d (%s)%s", sender, size, len(rcpts),
                 "held" if verdict is not None and verdict.hold else "queued",
                 _log_fields(verdict.log) if verdict is not None else "",
                 extra={"qid": qid, "client": self.client})
        self.services.metrics.received[self.listener] += 1
        self.reply(f"250 2.0.0 Ok: queued as {qid}")

    async def _store_or_queue(self, spool, sender: str, rcpts: list[str], chunks: list, meta: dict,
                              kwargs: dict) -> str:
        """Durable on return: delivered into local Maildirs at once when it can be
        (queue/direct.py), queued for whatever could not."""
        qid = kwargs.get("qid")
        if qid is not None and "state" not in kwargs:
            left = await direct.deliver_at_accept(self.services, qid, sender, rcpts, chunks, meta)
            if left is not None:
                if left:
                    await spool.enqueue(sender, left, chunks, meta, **kwargs)
                return qid
        return await spool.enqueue(sender, rcpts, chunks, meta, **kwargs)


def _log_fields(fields: dict) -> str:
    """Stage verdicts for the per-message log line: ", spf=pass, dkim=fail"."""
    return "".join(f", {k}={v}" for k, v in fields.items())
