#!/bin/sh
# Container entrypoint.  For `mailstack serve` (the default command) it makes a first
# start with an empty /data work with no file edited:
#   - /data/config.toml is written from `mailstack config sample` when absent, with
#     server.hostname from MAILSTACK_HOSTNAME and data_dir = /data;
#   - the domain in MAILSTACK_DOMAIN is added when it is not a local domain yet;
#   - the server makes a self-signed certificate in /data/tls on its first start.
# Then it execs the server, which becomes PID 1: `docker stop` (SIGTERM) reaches it
# directly and it stops at once; `docker kill -s HUP` reloads config and certificates.
# Any other command (`docker run IMAGE mailstack user list`, `sh`) is run as given.
set -eu

say() { printf 'mailstack-entrypoint: %s\n' "$*" >&2; }

case "${1:-}" in
    serve) set -- mailstack "$@" ;;
esac
if [ "${1:-}" != mailstack ] || [ "${2:-}" != serve ]; then
    exec "$@"
fi

DATA=/data
CONFIG=${MAILSTACK_CONFIG:-$DATA/config.toml}
export MAILSTACK_CONFIG="$CONFIG"  # for the `mailstack` commands below and the server
DOMAIN=$(printf '%s' "${MAILSTACK_DOMAIN:-}" | tr 'A-Z' 'a-z')

# Names go into TOML and shell commands: accept only what a DNS name may contain.
valid_name() {
    case "$1" in
        ''|*[!a-zA-Z0-9.-]*|.*|*.|*..*) return 1 ;;
    esac
    return 0
}

if [ ! -w "$DATA" ]; then
    say "cannot write to $DATA (owned by uid $(stat -c %u "$DATA"), this container runs as uid $(id -u))."
    say "for a host directory mounted on $DATA: chown -R $(id -u):$(id -g) <that directory>"
    exit 1
fi

if [ -n "$DOMAIN" ] && ! valid_name "$DOMAIN"; then
    say "MAILSTACK_DOMAIN=$DOMAIN is not a domain name"
    exit 1
fi

if [ ! -e "$CONFIG" ]; then
    HOST=${MAILSTACK_HOSTNAME:-}
    if [ -z "$HOST" ]; then
        if [ -n "$DOMAIN" ]; then HOST=mail.$DOMAIN; else HOST=$(hostname); fi
        say "MAILSTACK_HOSTNAME is not set: using $HOST (banners, HELO and the certificate carry it)"
    fi
    if ! valid_name "$HOST"; then
        say "MAILSTACK_HOSTNAME=$HOST is not a host name"
        exit 1
    fi
    # Nothing in /data is for other users: the config may later hold a relay password.
    umask 077
    # shutdown_grace below `docker stop`'s 10 s, so Docker never has to SIGKILL the server.
    # server.user matters only if the container is started as root (--user 0): the
    # server then binds its ports and drops to this user before accepting connections.
    mailstack config sample | sed -e '/^\[server\]$/,/^\[/{' \
        -e "s|^hostname = \"\"\$|hostname = \"$HOST\"|" \
        -e 's|^data_dir = "data"$|data_dir = "/data"|' \
        -e 's|^user = ""$|user = "mailstack"|' \
        -e 's|^shutdown_grace = 10.0$|shutdown_grace = 8.0|' \
        -e '}' > "$CONFIG.new"
    if ! grep -qx "hostname = \"$HOST\"" "$CONFIG.new" || ! grep -qx 'data_dir = "/data"' "$CONFIG.new"; then
        rm -f "$CONFIG.new"
        say "could not set server.hostname and server.data_dir in the sample config; please report this"
        exit 1
    fi
    mv "$CONFIG.new" "$CONFIG"
    say "first start: wrote $CONFIG (server.hostname = $HOST, all state in $DATA)"
fi

if [ -n "$DOMAIN" ] && ! grep -qxF "$DOMAIN" "$DATA/domains" 2>/dev/null; then
    mailstack domain add "$DOMAIN" >/dev/null
    say "added local domain $DOMAIN"
fi

# Until the first account exists, say how to make one and where certificates go.  (The
# accounts file starts with a comment line that counts its entries: look for an entry.)
if ! grep -q '^[^#[:space:]]' "$DATA/accounts" 2>/dev/null; then
    example=${DOMAIN:-example.com}
    say "no accounts yet. Add one (asks for the password):"
    say "    docker exec -it <container> mailstack user add alice@$example"
    [ -n "$DOMAIN" ] || say "  (first a domain: docker exec <container> mailstack domain add example.com)"
    say "certificates: a self-signed one is made in $DATA/tls/ (cert.pem, key.pem). For real ones,"
    say "    replace those two files (PEM chain + key, readable by uid $(id -u)), then: docker kill -s HUP <container>"
fi

exec "$@"
