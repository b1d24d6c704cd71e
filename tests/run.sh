#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need, then runs them.
#   bash tests/run.sh [pytest args...]
# Debian packages (real mail clients the tests drive) are installed with apt-get when
# missing and when running as root; Python packages with pip.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real mail clients the tests drive, and the real peer daemons they start on loopback
# (rspamd, spamd, clamd, OpenDKIM, Dovecot + Pigeonhole, Postfix).  Installing a daemon
# package must not start it on the standard ports: a policy-rc.d that exits 101 forbids
# that while apt runs (one already present, as in Docker images, is left alone).
DEBS=(swaks libnet-ssleay-perl curl mutt isync offlineimap3 fetchmail getmail6 haproxy
      rspamd spamassassin spamd spamc clamav-daemon clamav-milter spamass-milter
      opendkim opendkim-tools dovecot-imapd dovecot-pop3d dovecot-sieve
      dovecot-managesieved sieve-connect postfix postsrsd
      tzdata)  # the time zones the INTERNALDATE test runs in (tests/test_cold_parse_fast.py)
missing=()
for pkg in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    rcd=/usr/sbin/policy-rc.d ours=
    if [ ! -e "$rcd" ]; then
      printf '#!/bin/sh\n# temporary, from mailstack tests/run.sh: no daemons on install\nexit 101\n' >"$rcd"
      chmod 755 "$rcd"; ours=1
    fi
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ -z "$ours" ] || rm -f "$rcd"
    # Belt and braces: nothing the packages started may keep the standard ports.
    for d in rspamd clamav-daemon clamav-freshclam clamav-milter spamd spamassassin opendkim dovecot postfix postsrsd; do
      service "$d" stop >/dev/null 2>&1 || true
    done
  else
    echo "missing Debian packages (install them as root): ${missing[*]}" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
# Debian 12 / Ubuntu: the system Python refuses pip ("externally managed"): use the project's
# .venv (made by ./mailstack-setup, the README's first command) instead.
if [ -z "${PYTHON:-}" ] && "$PY" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))' 2>/dev/null; then
  ./mailstack-setup
  PY=.venv/bin/python
fi
"$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
