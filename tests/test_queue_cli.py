"""`mailstack queue ...` / `mailstack mailq` with a running server (control socket) and without."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import time

from queue_fixture import FakeRemote, QueueEnv, message, until

from mailstack.queue import control
from mailstack.queue.spool import Spool


def run(coro):
    return asyncio.run(coro)


def cli(env: QueueEnv, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailstack", *args, "--config", str(env.config_path)],
                          capture_output=True, text=True, timeout=60)


def _offline_queue(env: QueueEnv) -> tuple[str, str]:
    """Two messages left by a server that is not running: one deferred (with history), one in active."""
    async def main():
        async with env.running(remote=None):
            q1 = await env.spool.enqueue("carol@example.test", ["dave@remote.test"], [message("first")], {})
            await until(lambda: env.queue_files() == [f"deferred/{q1}"])
        spool = Spool(env.cfg.queue_dir)
        q2 = await spool.enqueue("carol@example.test", ["erin@remote.test", "alice@example.test"],
                                 [message("second")], {})
        spool.move(q2, "incoming", "active")
        return q1, q2

    return run(main())


def test_list_show_hold_release_delete_without_server(tmp_path):
    env = QueueEnv(tmp_path)
    q1, q2 = _offline_queue(env)

    r = cli(env, "queue", "list")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert q1 in out and q2 in out
    assert "deferred" in out and "active" in out
    assert "carol@example.test" in out and "dave@remote.test" in out and "erin@remote.test" in out
    assert "outbound delivery not configured" in out
    assert "Kbytes in 2 Requests." in out
    assert cli(env, "mailq").stdout == out

    data = json.loads(cli(env, "queue", "list", "--json").stdout)
    assert [m["qid"] for m in data] == sorted([q1, q2])
    assert {m["qid"]: m["state"] for m in data} == {q1: "deferred", q2: "active"}

    r = cli(env, "queue", "show", q1)
    assert r.returncode == 0, r.stderr
    assert f"Queue ID:  {q1}" in r.stdout and "State:     deferred" in r.stdout
    assert "<dave@remote.test>: deferred, attempts=1" in r.stdout
    assert "outbound delivery not configured" in r.stdout and "Next try:" in r.stdout

    r = cli(env, "queue", "hold", q1)
    assert r.returncode == 0 and f"{q1}: held" in r.stdout, r.stderr
    assert env.queue_files() == [f"active/{q2}", f"hold/{q1}"]
    assert "hold" in cli(env, "queue", "list").stdout

    r = cli(env, "queue", "flush")
    assert r.returncode == 1 and "not running" in r.stderr

    r = cli(env, "queue", "release", q1)
    assert r.returncode == 0, r.stderr
    assert env.queue_files() == [f"active/{q1}", f"active/{q2}"]

    r = cli(env, "queue", "delete", q2)
    assert r.returncode == 0, r.stderr
    assert env.queue_files() == [f"active/{q1}"]
    r = cli(env, "queue", "delete", q2)
    assert r.returncode == 1 and "no such message" in r.stderr
    r = cli(env, "queue", "show", "../../etc/passwd")
    assert r.returncode == 1

    r = cli(env, "queue", "delete", "ALL")
    assert r.returncode == 0 and "1 message(s) deleted" in r.stdout
    assert env.queue_files() == []
    assert os.listdir(env.cfg.queue_dir / "status") == []
    assert cli(env, "mailq").stdout == "Mail queue is empty\n"


def test_actions_through_control_socket_of_running_server(tmp_path):
    env = QueueEnv(tmp_path, queue={"retry_min": 600, "retry_max": 3600})
    answers = {"n": 0}

    def script(n, r):
        return ("sent", "250 2.0.0 Ok") if answers["n"] else ("deferred", "451 4.7.1 greylisted")

    remote = FakeRemote(script)

    async def main():
        async with env.running(remote=remote, control=True):
            sock = env.cfg.control_socket
            st = os.stat(sock)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            q1 = await env.spool.enqueue("carol@example.test", ["dave@remote.test"], [message("one")], {})
            q2 = await env.spool.enqueue("carol@example.test", ["erin@remote.test"], [message("two")], {})
            await until(lambda: sorted(env.queue_files()) == sorted([f"deferred/{q1}", f"deferred/{q2}"]))

            code, out, err = await env.cli("queue", "show", q1)
            assert code == 0, err
            assert "greylisted" in out and "relay=mx.remote.test[192.0.2.1]:25" in out

            code, out, err = await env.cli("queue", "hold", q2)
            assert code == 0, err
            assert env.queue_files() == [f"deferred/{q1}", f"hold/{q2}"]

            answers["n"] = 1
            t0 = time.monotonic()
            code, out, err = await env.cli("queue", "flush")
            assert code == 0 and "1 deferred" in out, (out, err)
            await until(lambda: env.queue_files() == [f"hold/{q2}"], what="flushed q1 delivered")
            assert time.monotonic() - t0 < 5  # at once, not at the next retry (hours in production)

            code, out, err = await env.cli("queue", "release", q2)
            assert code == 0, err
            await until(lambda: env.queue_files() == [], what="released q2 delivered")

            q3 = await env.spool.enqueue("carol@example.test", ["frank@remote.test"], [message("three")], {})
            answers["n"] = 0
            await until(lambda: env.queue_files() == [f"deferred/{q3}"])
            code, out, err = await env.cli("queue", "delete", q3)
            assert code == 0, err
            assert env.queue_files() == []

            resp = await asyncio.to_thread(control.request, sock, {"action": "status"})
            assert resp["ok"] and resp["queue_manager"]["running"]
            resp = await asyncio.to_thread(control.request, sock, {"action": "nonsense"})
            assert not resp["ok"] and "unknown action" in resp["error"]
            # a garbage line gets an error, not a crash
            def garbage():
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
                    s.sendall(b"{not json\n")
                    return s.recv(1000)
            assert b'"ok": false' in await asyncio.to_thread(garbage)
            return q1, q2

    run(main())
    recipients = sorted(r for c in remote.calls for r in c["recipients"])
    assert recipients.count("dave@remote.test") == 2 and recipients.count("erin@remote.test") == 2


def test_control_socket_refuses_second_server_and_replaces_stale(tmp_path):
    env = QueueEnv(tmp_path)

    async def main():
        async with env.running(control=True):
            services = env.make_services()
            try:
                await control.start_control(services)
            except control.ControlError as e:
                assert "another server is running" in str(e)
            else:
                raise AssertionError("second control socket started")
        # the socket file is left behind (stale): a new start replaces it
        assert os.path.exists(env.cfg.control_socket)
        assert control.request(env.cfg, {"action": "status"}) is None
        async with env.running(control=True):
            resp = await asyncio.to_thread(control.request, env.cfg, {"action": "status"})
            assert resp["ok"]

    run(main())


def test_reload_action_calls_the_servers_reload(tmp_path):
    env = QueueEnv(tmp_path)

    async def main():
        async with env.running(control=True):
            calls = []
            env.services.extra["reload"] = lambda: calls.append(1) or "reloaded"
            resp = await asyncio.to_thread(control.request, env.cfg, {"action": "reload"})
            assert resp == {"ok": True, "result": "reloaded"} and calls == [1]

    run(main())
