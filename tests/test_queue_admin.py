"""Queue commands with Postfix's meaning (postsuper, postqueue, postcat): `ALL [STATE]` touches
only that state; an unknown or extra word is an error that changes nothing; requeue, cat, list
filters, flush --domain.  Against a running manager (control socket) and on the files."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

from queue_fixture import FakeRemote, QueueEnv, message, until

from mailstack.queue.spool import Spool


def run(coro):
    return asyncio.run(coro)


def cli(env: QueueEnv, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailstack", *args, "--config", str(env.config_path)],
                          capture_output=True, text=True, timeout=60)


def _files(env):
    return sorted(env.queue_files())


def test_postsuper_semantics_without_server(tmp_path):
    env = QueueEnv(tmp_path)

    async def setup():
        async with env.running(remote=None):  # no outbound: remote mail is deferred
            d1 = await env.spool.enqueue("carol@example.test", ["dave@remote.test"], [message("d1")], {})
            d2 = await env.spool.enqueue("carol@example.test", ["erin@remote.test"], [message("d2")], {})
            await until(lambda: len(env.queue_files("deferred")) == 2)
        spool = Spool(env.cfg.queue_dir)
        h1 = await spool.enqueue("carol@example.test", ["x@remote.test"], [message("h1")], {}, state="hold")
        return d1, d2, h1

    d1, d2, h1 = run(setup())
    before = _files(env)
    # what used to delete everything, held mail included, is now an error that deletes nothing
    for words in (["ALL", "deferred", "extra"], ["ALL", "bogus"], ["all"], [d1, "notanid"], ["ALL", "maildrop"]):
        r = cli(env, "queue", "delete", *words)
        assert r.returncode == 2, (words, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert _files(env) == before
    r = cli(env, "queue", "delete", "ALL", "deferred", "hold", "bogus")  # postsuper: invalid directory name
    assert r.returncode == 2 and "'bogus' is not a queue state" in r.stderr and _files(env) == before
    r = cli(env, "queue", "release", "ALL", "deferred")
    assert r.returncode == 2 and "'deferred' is not a queue state for release" in r.stderr
    # ALL STATE: only that state
    r = cli(env, "queue", "delete", "ALL", "deferred")
    assert r.returncode == 0, r.stderr
    assert _files(env) == [f"hold/{h1}"]
    # requeue from hold, offline: into incoming/, taken up at the next start
    r = cli(env, "queue", "requeue", h1)
    assert r.returncode == 0 and f"{h1}: requeued" in r.stdout, r.stderr
    assert _files(env) == [f"incoming/{h1}"]


def test_requeue_cat_filters_and_flush_domain_with_server(tmp_path):
    env = QueueEnv(tmp_path, queue={"retry_min": 600, "retry_max": 3600})
    mode = {"ok": set()}

    def script(n, rcpt):
        domain = rcpt.rpartition("@")[2]
        if rcpt in mode["ok"] or domain in mode["ok"]:
            return "sent", "250 2.0.0 Ok"
        return "deferred", "451 4.7.1 try later"

    remote = FakeRemote(script)

    async def main():
        async with env.running(remote=remote, control=True):
            mode["ok"] = {"dave@remote.test"}
            q1 = await env.spool.enqueue("carol@example.test", ["dave@remote.test", "erin@remote.test"],
                                         [message("two-rcpts", body="the body\r\n")], {})
            q2 = await env.spool.enqueue("bob@example.test", ["zoe@other.test"], [message("other")], {})
            await until(lambda: _files(env) == sorted([f"deferred/{q1}", f"deferred/{q2}"]))
            calls = len(remote.calls)

            # list filters
            code, out, err = await env.cli("queue", "list", "--json", "--to", "*@other.test")
            assert code == 0, err
            assert [m["qid"] for m in json.loads(out)] == [q2]
            code, out, err = await env.cli("queue", "list", "--json", "--from", "CAROL", "--state", "deferred")
            assert [m["qid"] for m in json.loads(out)] == [q1]
            code, out, err = await env.cli("queue", "list", "--json", "--older-than", "1h")
            assert json.loads(out) == []
            code, out, err = await env.cli("queue", "list", "--json", "--state", "hold")
            assert json.loads(out) == []
            code, out, err = await env.cli("queue", "list", "--older-than", "soon")
            assert code == 2 and "is not an age" in err

            # cat: envelope, headers, body (postcat)
            code, out, err = await env.cli("queue", "cat", q1)
            assert code == 0, err
            assert f"*** ENVELOPE RECORDS deferred/{q1} ***" in out and "sender: carol@example.test" in out
            assert "recipient: erin@remote.test" in out and "Subject: two-rcpts" in out and "the body" in out
            code, out, err = await env.cli("queue", "cat", "--headers-only", q1)
            assert out.startswith("From: Carol") and "Subject: two-rcpts" in out and "the body" not in out
            code, out, err = await env.cli("queue", "cat", "--body-only", q1)
            assert out == "the body\r\n"
            code, out, err = await env.cli("queue", "cat", "0123456789ABCD")
            assert code == 1 and "no such message" in err

            # flush --domain: only the message waiting for other.test is tried now
            mode["ok"] = {"other.test"}
            code, out, err = await env.cli("queue", "flush", "--domain", "Other.Test")
            assert code == 0 and "1 deferred message(s) for other.test" in out, (out, err)
            await until(lambda: _files(env) == [f"deferred/{q1}"], what="q2 delivered")
            assert [c["qid"] for c in remote.calls[calls:]] == [q2]

            # requeue: tried at once; dave (delivered before) is not delivered again
            mode["ok"] = {"erin@remote.test"}
            t0 = time.monotonic()
            code, out, err = await env.cli("queue", "requeue", "ALL", "deferred")
            assert code == 0 and f"{q1}: requeued" in out, (out, err)
            await until(lambda: _files(env) == [], what="requeued q1 delivered")
            assert time.monotonic() - t0 < 10
            again = [c for c in remote.calls if c["qid"] == q1]
            assert [c["recipients"] for c in again] == [["dave@remote.test", "erin@remote.test"], ["erin@remote.test"]]

    run(main())
