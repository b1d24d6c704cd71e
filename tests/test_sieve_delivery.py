"""Sieve inside the queue's local delivery (real spool, real Maildir store, in process):
global before/after scripts, Junk as the default, failing scripts never lose mail,
reject as a DSN when the message had several recipients, redirect loops, duplicate."""
from __future__ import annotations

import asyncio
import logging

from harness import write_config
from queue_fixture import HOSTNAME, QueueEnv, message, until

from mailstack.sieve.scripts import ScriptStore


def run(coro):
    return asyncio.run(coro)


def make_env(tmp_path, sieve: dict | None = None) -> QueueEnv:
    env = QueueEnv(tmp_path)
    write_config(env.config_path, {
        "server": {"hostname": HOSTNAME, "data_dir": str(env.data_dir)},
        "queue": {"retry_min": 0.2, "retry_max": 0.4},
        "sieve": sieve or {},
    })
    return env


def put(env: QueueEnv, account: str, text: str, name: str = "main") -> None:
    store = ScriptStore(env.data_dir)
    store.put(account, name, text)
    store.set_active(account, name)


def folder(env: QueueEnv, account: str, name: str) -> list[tuple[str, bytes]]:
    """[(file name, bytes)] of a Maildir folder (flags are in the file name)."""
    base = env.maildir(account) / f".{name.replace('/', '.')}"
    out = []
    for sub in ("new", "cur"):
        d = base / sub
        if d.is_dir():
            out += [(p.name, p.read_bytes()) for p in d.iterdir()]
    return out


def test_before_user_after_scripts_and_flags(tmp_path):
    before, after = tmp_path / "before.sieve", tmp_path / "after.sieve"
    before.write_text('require ["imap4flags"];\nif header :contains "subject" "urgent" { addflag "\\\\Flagged"; }\n')
    after.write_text('require ["fileinto"];\nif header :contains "subject" "report" { fileinto :copy "Archive"; }\n'
                     .replace(":copy ", ""))
    env = make_env(tmp_path, {"before": str(before), "after": str(after)})
    put(env, "alice@example.test", 'require ["fileinto", "mailbox"];\n'
        'if header :contains "subject" "urgent" { fileinto :create "Urgent"; }\n')

    async def go():
        async with env.running():
            await env.spool.enqueue("carol@example.test", ["alice@example.test"], [message("urgent thing")], {})
            await env.spool.enqueue("carol@example.test", ["alice@example.test"], [message("weekly report")], {})
            await until(lambda: folder(env, "alice@example.test", "Urgent")
                        and folder(env, "alice@example.test", "Archive"), what="filed")
    run(go())
    (name, data), = folder(env, "alice@example.test", "Urgent")
    assert b"urgent thing" in data and ":2," in name and "F" in name.split(":2,")[1]  # \Flagged from before
    (_, data), = folder(env, "alice@example.test", "Archive")
    assert b"weekly report" in data
    assert not env.inbox("alice@example.test")  # the after script's fileinto cancelled the implicit keep


def test_implicit_keep_goes_to_junk_when_a_filter_said_junk(tmp_path):
    env = make_env(tmp_path)
    put(env, "alice@example.test", 'require "imap4flags";\naddflag "$seen-by-sieve";\n')

    async def go():
        async with env.running():
            await env.services.store.ensure_account("alice@example.test")
            await env.spool.enqueue("carol@example.test", ["alice@example.test"], [message("buy now")],
                                    {"junk": "rspamd: add header"})
            await until(lambda: folder(env, "alice@example.test", "Junk"), what="junk delivery")
    run(go())
    assert not env.inbox("alice@example.test")


def test_failing_scripts_deliver_to_inbox_with_one_log_line(tmp_path, caplog):
    env = make_env(tmp_path)
    store = ScriptStore(env.data_dir)
    d = store.user_dir("alice@example.test")
    d.mkdir(parents=True)
    (d / "broken.sieve").write_text('require "fileinto";\nfileinto :nonsense "x";\n')  # bypasses the check
    (d / "ACTIVE").write_text("broken")
    put(env, "bob@example.test", "".join(f'redirect "r{i}@remote.test";' for i in range(10)))  # over the limit

    async def go():
        async with env.running():
            await env.spool.enqueue("carol@example.test", ["alice@example.test"], [message("one")], {})
            await env.spool.enqueue("carol@example.test", ["bob@example.test"], [message("two")], {})
            await until(lambda: env.inbox("alice@example.test") and env.inbox("bob@example.test"),
                        what="kept in INBOX")
    with caplog.at_level(logging.WARNING, logger="mailstack.sieve"):
        run(go())
    lines = [r.getMessage() for r in caplog.records if r.name == "mailstack.sieve"]
    assert len([m for m in lines if "alice@example.test" in m and "line 2" in m]) == 1, lines
    assert len([m for m in lines if "bob@example.test" in m and "redirects" in m]) == 1, lines
    assert not env.queue_files("incoming") and not env.queue_files("deferred")  # no redirect went out


def test_reject_with_several_recipients_becomes_a_dsn(tmp_path):
    env = make_env(tmp_path)
    put(env, "alice@example.test", 'require "reject";\nreject "Not interested.";\n')

    async def go():
        async with env.running():
            await env.spool.enqueue("carol@example.test", ["alice@example.test", "bob@example.test"],
                                    [message("offer")], {})
            await until(lambda: env.inbox("bob@example.test") and env.inbox("carol@example.test"), what="DSN")
    run(go())
    dsn = env.inbox("carol@example.test")[0]
    assert b"Not interested." in dsn and b"alice@example.test" in dsn
    assert b"multipart/report" in dsn
    assert not env.inbox("alice@example.test")


def test_redirect_loop_is_detected_and_the_message_kept(tmp_path):
    env = make_env(tmp_path)
    put(env, "alice@example.test", 'redirect "bob@example.test";\n')
    put(env, "bob@example.test", 'redirect "alice@example.test";\n')

    async def go():
        async with env.running():
            await env.spool.enqueue("carol@example.test", ["alice@example.test"], [message("ping")], {})
            await until(lambda: env.inbox("bob@example.test") or env.inbox("alice@example.test"), what="loop end")
            await until(lambda: not env.queue_files(), what="queue empty")
    run(go())
    kept = env.inbox("alice@example.test") + env.inbox("bob@example.test")
    assert len(kept) == 1
    # two from the redirects, and the final delivery's own on top
    assert kept[0].count(b"Delivered-To:") == 3
    assert kept[0].startswith(b"Return-Path: <carol@example.test>\r\nDelivered-To: ")


def test_duplicate_and_vacation_memory_persist(tmp_path):
    env = make_env(tmp_path, {"vacation_min_period": 0.0})
    put(env, "alice@example.test", 'require ["duplicate", "fileinto", "mailbox", "vacation"];\n'
        'if duplicate { fileinto :create "Dups"; }\nvacation :days 1 "away";\n')

    async def go():
        async with env.running():
            for _ in range(3):
                await env.spool.enqueue("bob@example.test", ["alice@example.test"],
                                        [message("same", msgid="<same@x.test>")], {})
            await until(lambda: len(env.inbox("alice@example.test")) + len(folder(env, "alice@example.test",
                                                                                  "Dups")) == 3, what="three")
            await until(lambda: env.inbox("bob@example.test"), what="vacation reply")
            await until(lambda: not env.queue_files(), what="queue empty")
    run(go())
    assert len(env.inbox("alice@example.test")) == 1 and len(folder(env, "alice@example.test", "Dups")) == 2
    replies = env.inbox("bob@example.test")
    assert len(replies) == 1 and b"Auto-Submitted: auto-replied" in replies[0]
    assert (ScriptStore(env.data_dir).user_dir("alice@example.test") / "memory.json").exists()


def test_fileinto_a_name_the_store_refuses_goes_to_inbox(tmp_path, caplog):
    env = make_env(tmp_path)
    put(env, "alice@example.test", 'require ["fileinto", "mailbox"];\nfileinto :create "a//../b";\n')

    async def go():
        async with env.running():
            await env.spool.enqueue("carol@example.test", ["alice@example.test"], [message("odd")], {})
            await until(lambda: env.inbox("alice@example.test"), what="INBOX")
    with caplog.at_level(logging.WARNING, logger="mailstack.sieve"):
        run(go())
    assert [r for r in caplog.records if "a//../b" in r.getMessage()]
    assert not env.queue_files()


def test_include_global_and_personal_scripts_from_disk(tmp_path):
    env = make_env(tmp_path)
    store = ScriptStore(env.data_dir)
    store.global_dir().mkdir(parents=True)
    (store.global_dir() / "spam.sieve").write_text(
        'require ["fileinto", "mailbox", "include"];\n'
        'if header :contains "subject" "lottery" { fileinto :create "Spammy"; stop; }\n')
    store.put("alice@example.test", "lists", 'require ["fileinto", "mailbox", "include"];\n'
              'if header :contains "subject" "[dev]" { fileinto :create "Dev"; return; }\n')
    put(env, "alice@example.test", 'require ["include", "fileinto"];\ninclude :global "spam";\n'
        'include :personal "lists";\nfileinto "Archive";\n')

    async def go():
        async with env.running():
            await env.services.store.ensure_account("alice@example.test")
            for subject in ("lottery win", "[dev] build", "hello"):
                await env.spool.enqueue("carol@example.test", ["alice@example.test"], [message(subject)], {})
            await until(lambda: folder(env, "alice@example.test", "Spammy")
                        and folder(env, "alice@example.test", "Dev")
                        and len(folder(env, "alice@example.test", "Archive")) == 2, what="three filings")
    run(go())
    assert b"lottery" in folder(env, "alice@example.test", "Spammy")[0][1]
    archived = b"".join(d for _, d in folder(env, "alice@example.test", "Archive"))
    assert b"[dev] build" in archived and b"hello" in archived  # return ends only the included script
    assert not env.inbox("alice@example.test")


def test_editheader_changes_the_stored_copy(tmp_path):
    env = make_env(tmp_path)
    put(env, "alice@example.test", 'require ["editheader", "fileinto"];\n'
        'deleteheader "X-Internal";\naddheader "X-Filtered" "by sieve";\n'
        'deleteheader :index 1 "Received";\n')  # Received is protected: a run-time error keeps the original

    put(env, "bob@example.test", 'require ["editheader"];\ndeleteheader "X-Internal";\n'
        'addheader :last "X-Filtered" "by sieve";\n')

    async def go():
        async with env.running():
            for rcpt in ("alice@example.test", "bob@example.test"):
                await env.spool.enqueue("carol@example.test", [rcpt],
                                        [message("edit me", extra="X-Internal: secret\r\n")], {})
            await until(lambda: env.inbox("alice@example.test") and env.inbox("bob@example.test"), what="both")
    run(go())
    alice, = env.inbox("alice@example.test")
    assert b"X-Internal: secret" in alice and b"X-Filtered" not in alice  # error: the message as it came
    bob, = env.inbox("bob@example.test")
    head, _, body = bob.partition(b"\r\n\r\n")
    assert b"X-Internal" not in head and head.endswith(b"X-Filtered: by sieve") and body == b"Hi there.\r\n"
