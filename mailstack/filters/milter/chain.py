"""Every configured milter, following one SMTP session the way Postfix drives them.

One `MilterSession` per (SMTP connection, milter), opened at connect.  Each SMTP event
goes to each milter in order with the macros Postfix sends; answers map onto the
session's replies (Postfix's texts), and the end-of-message answers onto a Verdict.
A milter that fails (down, slow, broken) gets its default action: `accept` leaves it out
for the rest of the connection, `tempfail` answers 451 4.7.1 (and keeps answering it for
later transactions of that connection), `reject` answers 550 5.7.1.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ... import __version__
from ...smtp.hooks import Connection, Transaction, Verdict
from . import codec
from .client import MilterConfig, MilterSession, MilterUnavailable

log = logging.getLogger("mailstack.filters")

TEMPFAIL = "451 4.7.1 Service unavailable - try again later"
REJECT = "550 5.7.1 Command rejected"
CONNECT_REJECT = "554 5.7.1 Access denied"

# Modification -> the action bit the milter must have asked for in option negotiation.
NEEDS = {codec.R_ADDHEADER: codec.F_ADDHDRS, codec.R_INSHEADER: codec.F_ADDHDRS, codec.R_CHGHEADER: codec.F_CHGHDRS,
         codec.R_REPLBODY: codec.F_CHGBODY, codec.R_ADDRCPT: codec.F_ADDRCPT, codec.R_DELRCPT: codec.F_DELRCPT,
         codec.R_ADDRCPT_PAR: codec.F_ADDRCPT_PAR, codec.R_CHGFROM: codec.F_CHGFROM,
         codec.R_QUARANTINE: codec.F_QUARANTINE}


@dataclass
class Peer:
    """One milter within one SMTP connection."""

    cfg: MilterConfig
    session: MilterSession | None = None
    done: bool = False  # accepted (or left out after a failure): not asked again this connection
    txn_done: bool = False  # accepted this transaction
    sticky: str | None = None  # a reply every later MAIL gets (failure with tempfail/reject)
    discard: bool = False  # discard the current transaction's message


@dataclass
class ConnState:
    peers: list[Peer] = field(default_factory=list)
    in_txn: bool = False
    errors: int = 0  # milter failures seen (metrics)


def connect_macros(conn: Connection) -> dict[str, str]:
    name = conn.rdns or "unknown"
    return {"j": conn.hostname, "{daemon_name}": conn.listener, "v": f"mailstack {__version__}",
            "_": f"{name} [{conn.ip}]", "{client_addr}": conn.ip, "{client_name}": name,
            "{client_ptr}": name}


class MilterChain:
    def __init__(self, milters: list[MilterConfig], metrics=None) -> None:
        self.milters = milters
        self.metrics = metrics

    # --- failures ----------------------------------------------------------------------------
    def _failed(self, peer: Peer, state: ConnState, where: str, error: Exception) -> str | None:
        """Apply the default action of a milter that failed; returns the reply (or None)."""
        state.errors += 1
        log.warning("milter %s failed at %s: %s; default action %s", peer.cfg.name, where, error,
                    peer.cfg.default_action)
        if peer.session is not None:
            peer.session.close(quit=False)
        peer.done = True
        if peer.cfg.default_action == "accept":
            return None
        peer.sticky = TEMPFAIL if peer.cfg.default_action == "tempfail" else REJECT
        return peer.sticky

    @staticmethod
    def _reply(answer: codec.Response | None, peer: Peer, stage: str) -> str | None:
        """A non-final-stage answer -> SMTP reply or None (continue)."""
        if answer is None or answer.code == codec.R_CONTINUE:
            return None
        code = answer.code
        if code == codec.R_ACCEPT:
            if stage in ("connect", "helo"):
                peer.done = True
                if peer.session is not None:
                    peer.session.close()
            else:
                peer.txn_done = True
            return None
        if code == codec.R_DISCARD:
            peer.discard = True
            return None
        if code == codec.R_REPLYCODE:
            return _one_line(answer.text)
        if code == codec.R_REJECT:
            return CONNECT_REJECT if stage == "connect" else REJECT
        if code in (codec.R_TEMPFAIL, codec.R_CONN_FAIL, codec.R_SHUTDOWN):
            return TEMPFAIL
        return None  # skip outside the body: nothing to skip

    def _live(self, state: ConnState):
        for peer in state.peers:
            if not peer.done and peer.session is not None:
                yield peer

    # --- SMTP events -------------------------------------------------------------------------
    async def connect(self, conn: Connection, state: ConnState) -> str | None:
        state.peers = [Peer(cfg) for cfg in self.milters]
        macros = connect_macros(conn)
        for peer in state.peers:
            peer.session = MilterSession(peer.cfg)
            try:
                await peer.session.open()
                # The client's name, or "[address]" when it has none (as sendmail sends it).
                hostname = conn.rdns or f"[{conn.ip}]"
                answer = await peer.session.send(codec.CONNECT, codec.encode_connect(hostname, conn.ip),
                                                 macros, codec.STAGE_CONNECT)
            except MilterUnavailable as e:
                self._failed(peer, state, "connect", e)  # the reply waits for MAIL, as Postfix does
                continue
            reply = self._reply(answer, peer, "connect")
            if reply:
                return reply
        return None

    async def helo(self, conn: Connection, state: ConnState) -> str | None:
        for peer in list(self._live(state)):
            try:
                answer = await peer.session.send(codec.HELO, codec.encode_helo(conn.helo or ""), {},
                                                 codec.STAGE_HELO)
            except MilterUnavailable as e:
                self._failed(peer, state, "helo", e)
                continue
            reply = self._reply(answer, peer, "helo")
            if reply:
                return reply
        return None

    async def mail(self, conn: Connection, txn: Transaction, state: ConnState) -> str | None:
        if state.in_txn:  # the last transaction ended without DATA (RSET, errors): tell them
            for peer in self._live(state):
                peer.session.abort()
        state.in_txn = True
        for peer in state.peers:
            peer.txn_done = peer.discard = False
        for peer in state.peers:
            if peer.sticky:
                return peer.sticky
        local, _, domain = txn.mail_from.rpartition("@")
        macros = {"{auth_type}": "PLAIN" if conn.auth_user else None, "{auth_authen}": conn.auth_user,
                  "{mail_addr}": txn.mail_from, "{mail_host}": domain if local else "",
                  "{mail_mailer}": "smtp"}
        for peer in list(self._live(state)):
            try:
                answer = await peer.session.send(codec.MAIL, codec.encode_envelope(codec.MAIL, txn.mail_from),
                                                 macros, codec.STAGE_ENVFROM)
            except MilterUnavailable as e:
                reply = self._failed(peer, state, "mail", e)
                if reply:
                    return reply
                continue
            reply = self._reply(answer, peer, "mail")
            if reply:
                return reply
        return None

    async def rcpt(self, conn: Connection, txn: Transaction, rcpt: str, state: ConnState) -> str | None:
        macros = {"{rcpt_addr}": rcpt, "{rcpt_host}": rcpt.rpartition("@")[2], "{rcpt_mailer}": "local"}
        for peer in list(self._live(state)):
            if peer.txn_done:
                continue
            try:
                answer = await peer.session.send(codec.RCPT, codec.encode_envelope(codec.RCPT, rcpt),
                                                 macros, codec.STAGE_ENVRCPT)
            except MilterUnavailable as e:
                reply = self._failed(peer, state, "rcpt", e)
                if reply:
                    return reply
                continue
            reply = self._reply(answer, peer, "rcpt")
            if reply:
                return reply
        return None

    async def data(self, conn: Connection, txn: Transaction, message: bytes, state: ConnState,
                   skip: bool = False) -> Verdict:
        """The message through every milter still in the conversation, each seeing the
        changes of the ones before it."""
        verdict = Verdict()
        state.in_txn = False
        actions: list[str] = []
        for peer in state.peers:
            if peer.sticky:
                verdict.reply = peer.sticky
                return verdict
        for peer in list(self._live(state)):
            if peer.txn_done or skip:
                peer.session.abort()
                continue
            if peer.discard:
                verdict.discard = True
                break
            try:
                answer, mods = await self._message(peer, txn, message)
            except MilterUnavailable as e:
                reply = self._failed(peer, state, "end of message", e)
                if reply:
                    verdict.reply = reply
                    break
                continue
            if answer.code in (codec.R_ACCEPT, codec.R_CONTINUE, codec.R_SKIP):
                bad = [m.code for m in mods if not peer.session.actions & NEEDS[m.code]]
                if bad:
                    reply = self._failed(peer, state, "end of message",
                                         MilterUnavailable(f"modification {bad[0]!r} not negotiated"))
                    if reply:
                        verdict.reply = reply
                        break
                    continue
                try:
                    changes = codec.apply_modifications(message, mods,
                                                        bool(peer.session.protocol & codec.P_HDR_LEADSPC))
                except codec.ProtocolError as e:
                    reply = self._failed(peer, state, "end of message", e)
                    if reply:
                        verdict.reply = reply
                        break
                    continue
                if changes.message is not None:
                    message = verdict.message = changes.message
                verdict.add_rcpts += changes.add_rcpts
                verdict.del_rcpts += changes.del_rcpts
                if changes.sender is not None:
                    verdict.sender = changes.sender
                actions += changes.actions
                if changes.quarantine:
                    verdict.hold = f"milter {peer.cfg.name}: {changes.quarantine}"
                    break
                continue
            if answer.code == codec.R_DISCARD:
                verdict.discard = True
            else:
                verdict.reply = self._reply(answer, peer, "eom") or TEMPFAIL
            actions.append({codec.R_DISCARD: "discard", codec.R_REJECT: "reject", codec.R_TEMPFAIL: "tempfail",
                            codec.R_REPLYCODE: "replycode"}.get(answer.code, "tempfail"))
            break
        if actions:
            verdict.log["milter"] = ",".join(dict.fromkeys(actions))
        return verdict

    async def _message(self, peer: Peer, txn: Transaction, message: bytes):
        session = peer.session
        i = {"i": txn.qid or ""}
        answer = await session.send(codec.DATA, codec.packet(codec.DATA), i, codec.STAGE_DATA)
        if answer is not None and answer.code != codec.R_CONTINUE:
            return answer, []
        headers, body = codec.split_message(message)
        lead = bool(session.protocol & codec.P_HDR_LEADSPC)
        if session.wants(codec.HEADER):
            for name, value in headers:
                if value is None:
                    continue
                answer = await session.send(codec.HEADER, codec.encode_header(name, codec.milter_value(value, lead)))
                if answer is not None and answer.code != codec.R_CONTINUE:
                    if answer.code == codec.R_SKIP:
                        break
                    return answer, []
        answer = await session.send(codec.EOH, codec.packet(codec.EOH), i, codec.STAGE_EOH)
        if answer is not None and answer.code != codec.R_CONTINUE:
            return answer, []
        answer = await session.send_body(body)
        if answer is not None and answer.code not in (codec.R_CONTINUE, codec.R_SKIP):
            return answer, []
        return await session.end_of_message(i)

    def close(self, state: ConnState) -> None:
        for peer in state.peers:
            if peer.session is not None:
                peer.session.close()


def _one_line(text: str) -> str:
    """A replycode answer may be multi-line ("550-a\\r\\n550 b"): the session sends one line."""
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line]
    return lines[-1].replace("-", " ", 1) if lines and lines[-1][3:4] == "-" else (lines[-1] if lines else TEMPFAIL)
