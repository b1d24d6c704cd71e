"""Configuration: validation names the key, `config check` prints effective settings."""
import subprocess
import sys
from pathlib import Path

import pytest

from mailstack import config
from mailstack.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def check(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return subprocess.run([sys.executable, "-m", "mailstack", "config", "check", "--config", str(p)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("text, key, reason", [
    ("[smtp]\nmax_mesage_size = 10\n", "smtp.max_mesage_size", "unknown key"),
    ("[smpt]\n", "smpt", "unknown section"),
    ("[smtp]\nmax_message_size = \"big\"\n", "smtp.max_message_size", "whole number"),
    ("[smtp]\nmax_message_size = 10\n", "smtp.max_message_size", "at least"),
    ("[smtp]\nbare_lf = \"sometimes\"\n", "smtp.bare_lf", "one of"),
    ("[smtp]\ntrusted_networks = [\"10.0.0.0/33\"]\n", "smtp.trusted_networks", "network"),
    ("[listen]\nsmtp = [\"0.0.0.0:99999\"]\n", "listen.smtp", "host:port"),
    ("[listen]\nsmtp = [\"127.0.0.1:2525\"]\nimap = [\"127.0.0.1:2525\"]\n", "listen.imap", "also used"),
    ("[imap]\nallow_plaintext_auth = \"yes\"\n", "imap.allow_plaintext_auth", "true or false"),
    ("[queue]\nretry_min = 600.0\nretry_max = 60.0\n", "queue.retry_max", "retry_min"),
    ("[tls]\ncert = \"/x.pem\"\n", "tls.key", "together"),
    ("[server]\nhostname = 3\n", "server.hostname", "string"),
    ("[server]\nbackground_index = \"no\"\n", "server.background_index", "true or false"),
    ("[server]\nmailbox_cache_messages = -1\n", "server.mailbox_cache_messages", "at least"),
    ("[server]\nmailbox_cache_messages = \"lots\"\n", "server.mailbox_cache_messages", "whole number"),
])
def test_bad_config_one_line_naming_the_key(tmp_path, text, key, reason):
    r = check(tmp_path, text)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert key in lines[0] and reason in lines[0], lines[0]


def test_not_toml(tmp_path):
    r = check(tmp_path, "[smtp\n")
    assert r.returncode != 0 and "not valid TOML" in r.stderr


def test_check_prints_effective_settings_with_defaults(tmp_path):
    r = check(tmp_path, "[smtp]\nmax_recipients = 50\n")
    assert r.returncode == 0, r.stderr
    assert "max_recipients = 50" in r.stdout
    assert "max_message_size = 26214400" in r.stdout  # a default
    assert "[imap]" in r.stdout and "idle_timeout = 1800.0" in r.stdout
    # and what it prints is itself a valid config giving the same settings
    again = tmp_path / "again.toml"
    again.write_text(r.stdout)
    assert config.dump(config.load(again)) == r.stdout


def test_bundled_config_is_valid_and_documents_every_key():
    cfg = config.load(ROOT / "config.toml")
    text = (ROOT / "config.toml").read_text()
    for section, keys in config.SCHEMA.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"\n{key} = " in text, f"{section}.{key} missing from config.toml"
    assert cfg.listen.smtp == [("0.0.0.0", 25)]


def test_readme_references_every_key():
    readme = (ROOT / "README.md").read_text()
    for section, keys in config.SCHEMA.items():
        for key in keys:
            assert f"`{section}.{key}`" in readme, f"{section}.{key} missing from README reference"


def test_relative_paths_resolve_against_config_dir(tmp_path):
    p = tmp_path / "sub" / "c.toml"
    p.parent.mkdir()
    p.write_text('[server]\ndata_dir = "state"\n')
    assert config.load(p).data_dir == p.parent / "state"


def test_from_dict_errors_are_configerror():
    with pytest.raises(ConfigError, match=r"^smtp.max_recipients: must be at least 1"):
        config.from_dict({"smtp": {"max_recipients": 0}}, Path("."))


def test_generated_docs_are_current():
    """config.toml and the README reference are generated from the schema: run
    `python tests/update_docs.py` after adding a key."""
    assert (ROOT / "config.toml").read_text() == config.sample()
    assert config.reference_markdown() in (ROOT / "README.md").read_text()


def test_check_does_not_print_secrets(tmp_path):
    r = check(tmp_path, '[delivery]\nrelayhost = "[smarthost.test]:587"\nrelayhost_password = "hunter2"\n')
    assert r.returncode == 0, r.stderr
    assert "hunter2" not in r.stdout and "relayhost_password = \"********\"" in r.stdout
