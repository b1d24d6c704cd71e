"""What an operator watches: the hold queue in the queue gauge, the age of the oldest message
per state, days until the certificate expires, build info; and the README's metric table names
exactly the families /metrics serves."""
from __future__ import annotations

import platform
import re
import smtplib
import urllib.request
from pathlib import Path

from harness import MailServer, free_port, wait_for
from test_metrics import parse_exposition, value

from mailstack import __version__

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_metric_names() -> set[str]:
    text = README.read_text()
    table = text[text.index("| metric | labels | what |"):]
    table = table[:table.index("\n\n")]
    return {m for row in table.splitlines()[2:] for m in re.findall(r"`(mailstack_\w+)`", row.split("|")[1])}


def test_queue_ages_certificate_build_info_and_readme_table(tmp_path):
    mport = free_port()
    with MailServer(tmp_path, {"metrics": {"listen": f"127.0.0.1:{mport}"}, "delivery": {"outbound": False},
                               "smtp": {"trusted_networks": ["127.0.0.1/32"]}}, listeners=("smtp",)) as srv:
        srv.add_domain("example.test")
        srv.start()
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
            s.sendmail("a@example.test", ["x@remote.test"], b"Subject: 1\r\n\r\nhi\r\n")
            s.sendmail("a@example.test", ["y@remote.test"], b"Subject: 2\r\n\r\nhi\r\n")
        url = f"http://127.0.0.1:{mport}/metrics"

        def scrape():
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.read().decode()

        wait_for(lambda: value(parse_exposition(scrape()), "mailstack_queue_messages", state="deferred") == 2,
                 what="two deferred messages")
        qid = srv.cli("queue", "list", "--json").stdout.split('"qid": "')[1].split('"')[0]
        srv.cli("queue", "hold", qid)
        # the queue moves the file when the control request is handled: wait for the gauge
        # (the other message is retried every 0.5-2 s here: for a moment it is in active/)
        def held() -> str | None:
            text = scrape()
            samples = parse_exposition(text)
            both = (value(samples, "mailstack_queue_messages", state="hold") == 1
                    and value(samples, "mailstack_queue_messages", state="deferred") == 1)
            return text if both else None
        text = wait_for(held, what="the held message in the gauge")
        samples = parse_exposition(text)
        assert value(samples, "mailstack_queue_messages", state="hold") == 1
        assert value(samples, "mailstack_queue_messages", state="deferred") == 1
        assert value(samples, "mailstack_queue_oldest_message_age_seconds", state="hold") > 0
        assert value(samples, "mailstack_queue_oldest_message_age_seconds", state="incoming") == 0
        days = value(samples, "mailstack_tls_certificate_expiry_days", cert=str(srv.cert_path))
        assert 800 < days <= 825  # the self-signed certificate is made for 825 days
        assert value(samples, "mailstack_build_info", version=__version__, event_loop="asyncio",
                     python=platform.python_version()) == 1

        served = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
        documented = readme_metric_names()
        assert documented == served, (f"in README, not served: {sorted(documented - served)}; "
                                      f"served, not in README: {sorted(served - documented)}")
        assert srv.stop() == 0
