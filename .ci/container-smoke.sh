#!/usr/bin/env bash
# Prove the Docker image: build the project's Dockerfile, unchanged, and run it as a user
# would (`docker run -d -v VOLUME:/data -p 127.0.0.1:P:25 ...`), on a machine with no Docker
# engine and no registry (CI: Debian bookworm, root).  podman from Debian does the work; a
# stand-in for python:3.12-slim (Debian's CPython 3.11 in a venv) is made with debootstrap
# and tagged under that name in a private image store, so the Dockerfile's FROM resolves.
# Recipe and pitfalls: ../shared/notes/container-ci.md.
#
#   bash .ci/container-smoke.sh            (from anywhere; as root)
#
# Everything podman keeps lives in $WORK (default /tmp/mailstack-container-ci): a second
# run reuses the base images (warm: seconds).  Prints "N passed, M failed" last; exits 1 if
# anything failed.  Skips (exit 0, says why) only where podman cannot be had.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CTX=${CTX:-$(dirname "$HERE")}              # build context: the repository
DOCKERFILE=${DOCKERFILE:-$CTX/Dockerfile}
WORK=${WORK:-/tmp/mailstack-container-ci}
FROM_NAME=docker.io/library/python:3.12-slim  # what the Dockerfile's FROM resolves to
STANDIN=localhost/python:3.12-slim-standin-1  # bump the suffix when the stand-in recipe changes
IMAGE=localhost/mailstack:ci
CNAME=mailstack-ci-$$
VOLUME=mailstack-ci-data-$$
DOMAIN=ci.test
MAILHOST=mail.ci.test
USER_ADDR=alice@$DOMAIN
USER_PW="ci-$$-$RANDOM-pass"
PROBE=(python3 "$HERE/container_probe.py")

PASSED=0 FAILED=0
t() { printf '[%4ds] %s\n' "$SECONDS" "$*"; }
pass() { PASSED=$((PASSED + 1)); t "PASS $*"; }
fail() { FAILED=$((FAILED + 1)); t "FAIL $*"; }
summary() { echo "$PASSED passed, $FAILED failed"; }
finish() { summary; [ "$FAILED" = 0 ]; exit; }
skip() { echo "container smoke test skipped: $*"; summary; exit 0; }
fatal() {  # a step everything after it depends on failed: show why, stop here
  fail "$1"; shift
  [ $# -gt 0 ] && "$@" 2>&1 | tail -40 | sed 's/^/    /'
  finish
}
# check NAME CMD...: one test; its output is shown indented
check() {
  local name=$1 out; shift
  if out=$("$@" 2>&1); then pass "$name"; else fail "$name"; fi
  [ -n "$out" ] && printf '%s\n' "$out" | tail -20 | sed 's/^/    /'
  return 0
}

# --- 1. tools ------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || skip "needs root (podman with a private store, debootstrap)"
command -v apt-get >/dev/null || command -v podman >/dev/null || skip "no podman and no apt-get to install it"
# runc, named: apt may otherwise pick crun, which refuses this machine's hybrid cgroups
# ("cgroups in hybrid mode not supported, drop all controllers from cgroupv2").
if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null || ! command -v runc >/dev/null; then
  t "installing podman, runc and debootstrap from Debian"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq podman runc debootstrap \
      >"/tmp/mailstack-container-ci-apt.log" 2>&1 \
    || { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null 2>&1;
         DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq podman runc debootstrap \
           >>"/tmp/mailstack-container-ci-apt.log" 2>&1; } \
    || skip "podman cannot be installed here: $(tail -1 /tmp/mailstack-container-ci-apt.log)"
fi
t "tools: $(podman --version)"

mkdir -p "$WORK"
exec 9>"$WORK/lock"
flock -w 1200 9 || fatal "another run holds $WORK/lock"

# --- 2. private podman config: own image store, limits this sandbox allows ----------------
cat > "$WORK/storage.conf" <<CONF
[storage]
driver = "${STORAGE_DRIVER:-overlay}"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
CONF
cat > "$WORK/containers.conf" <<CONF
[containers]
# no CAP_SYS_RESOURCE here: podman's default rlimits (1048576) make runc fail
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=32768:32768"]
# Docker (>= 20.10) sets this in every container; podman 4.3 does not.  The image runs
# as a non-root user that binds ports < 1024, so this is what makes it behave as under Docker.
default_sysctls = ["net.ipv4.ping_group_range=0 0", "net.ipv4.ip_unprivileged_port_start=0"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_STORAGE_CONF=$WORK/storage.conf CONTAINERS_CONF=$WORK/containers.conf

# --- 3. base image from Debian packages only (cached in the private store) -----------------
_uris=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}';
        grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}'; true)
MIRROR=${MIRROR:-$(echo "$_uris" | grep -v -- '-security' | head -1)}
SECURITY_MIRROR=${SECURITY_MIRROR:-$(echo "$_uris" | grep -- '-security' | head -1)}
SECURITY_MIRROR=${SECURITY_MIRROR:-$MIRROR-security}
if ! podman image exists localhost/debian:bookworm; then
  t "making the base image with debootstrap from $MIRROR (about a minute, once)"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || fatal "debootstrap" tail -20 "$WORK/debootstrap.log"
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
    "$MIRROR" "$MIRROR" "$SECURITY_MIRROR" > "$WORK/rootfs/etc/apt/sources.list"
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/* \
         "$WORK/rootfs/etc/resolv.conf" "$WORK/rootfs/etc/hostname"
  tar --numeric-owner -C "$WORK/rootfs" -c . \
    | podman import -q --change 'CMD ["/bin/bash"]' - localhost/debian:bookworm >/dev/null \
    || fatal "podman import of the base image"
  rm -rf "$WORK/rootfs"
fi
t "base image localhost/debian:bookworm ready"

# --- 4. stand-in for python:3.12-slim ------------------------------------------------------
# Debian's CPython 3.11 in a venv on PATH (the code must stay 3.11-compatible).  The host's
# extra CAs (this network intercepts TLS) are folded into the image's bundle for pip.
if ! podman image exists "$STANDIN"; then
  t "making the python:3.12-slim stand-in (half a minute, once)"
  mkdir -p "$WORK/pybase"
  cat > "$WORK/pybase/Containerfile" <<'CF'
FROM localhost/debian:bookworm
ENV LANG=C.UTF-8
RUN export DEBIAN_FRONTEND=noninteractive && apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && python3 -m venv /usr/local/python \
 && /usr/local/python/bin/pip install --no-cache-dir --upgrade pip \
 && ln -s /usr/local/python/bin/python /usr/local/bin/python \
 && ln -s /usr/local/python/bin/pip /usr/local/bin/pip
ENV PATH=/usr/local/python/bin:$PATH
CMD ["python3"]
CF
  podman build -q --network host --pull=never \
    -v /usr/local/share/ca-certificates:/usr/local/share/ca-certificates:ro \
    -t "$STANDIN" "$WORK/pybase" >"$WORK/standin.log" 2>&1 \
    || fatal "building the stand-in" tail -30 "$WORK/standin.log"
fi
podman tag "$STANDIN" "$FROM_NAME"   # only inside $WORK's store
t "stand-in ready as $FROM_NAME"

# --- 5. build the Dockerfile, unchanged -----------------------------------------------------
# --network host: RUN steps reach PyPI without podman adding a bridge or firewall rules.
# --format docker: OCI images drop HEALTHCHECK.
build_start=$SECONDS
if timeout 900 podman build --network host --pull=never --format docker -f "$DOCKERFILE" -t "$IMAGE" "$CTX" \
     >"$WORK/build.log" 2>&1; then
  pass "image builds from the unchanged Dockerfile ($((SECONDS - build_start)) s, $(podman image inspect "$IMAGE" --format '{{.Size}}') bytes)"
else
  fatal "image builds from the unchanged Dockerfile" tail -40 "$WORK/build.log"
fi
check "image carries a HEALTHCHECK that asks the server" bash -c "podman image inspect '$IMAGE' \
  | python3 -c 'import json, sys; t = json.load(sys.stdin)[0][\"Healthcheck\"][\"Test\"]; print(t); assert \"status\" in t'"

# --- 6. run it as a user would ---------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cleanup() {
  podman rm -f -t 0 "$CNAME" "$CNAME-2" "$CNAME-idle" >/dev/null 2>&1
  podman volume rm -f "$VOLUME" >/dev/null 2>&1
  return 0
}
trap cleanup EXIT
P25=$(free_port) P465=$(free_port) P993=$(free_port)
run_container() {  # NAME: like `docker run -d`, only loopback ports published, slirp4netns
  P25=$(free_port) P465=$(free_port) P993=$(free_port)
  podman run -d --pull=never --name "$1" --network slirp4netns \
    -e MAILSTACK_HOSTNAME=$MAILHOST -e MAILSTACK_DOMAIN=$DOMAIN -v "$VOLUME:/data" \
    -p "127.0.0.1:$P25:25" -p "127.0.0.1:$P465:465" -p "127.0.0.1:$P993:993" "$IMAGE" \
    >/dev/null 2>>"$WORK/podman-run.log"  # podman says it cannot schedule health checks without systemd
}
logs() { podman logs "$CNAME" 2>&1 | tail -40; }

run_start=$SECONDS
run_container "$CNAME" || fatal "podman run"
if out=$("${PROBE[@]}" banner "$P25" 2>&1); then
  pass "first start on an empty volume: SMTP greeting on 127.0.0.1:$P25 after $((SECONDS - run_start)) s ($out)"
else
  fatal "first start on an empty volume: SMTP greeting on 127.0.0.1:$P25 ($out)" logs
fi

check "first-start log says how to add a user and where certificates go" \
  bash -c "podman logs '$CNAME' 2>&1 | grep -F 'docker exec -it <container> mailstack user add alice@$DOMAIN' \
           && podman logs '$CNAME' 2>&1 | grep -F 'docker kill -s HUP' && podman logs '$CNAME' 2>&1 | grep -F '/data/tls'"
check "the server runs as the non-root user (PID 1, uid 5025)" \
  bash -c "podman exec '$CNAME' cat /proc/1/status | grep -E '^(Name|Uid):' | tee /dev/stderr | grep -qE '^Uid:\s+5025\s+5025\s'"
check "config generated in the volume with hostname and data_dir from the environment" \
  podman exec "$CNAME" sh -c "grep -x 'hostname = \"$MAILHOST\"' /data/config.toml && grep -x 'data_dir = \"/data\"' /data/config.toml"
check "docker exec ... mailstack user add (finds the config by itself)" \
  bash -c "printf '%s\n' '$USER_PW' | podman exec -i '$CNAME' mailstack user add '$USER_ADDR' --password-stdin"

podman exec "$CNAME" cat /data/tls/cert.pem > "$WORK/cert.pem" 2>/dev/null
check "SMTP into the container on a mapped loopback port" \
  "${PROBE[@]}" send-mx "$P25" "$USER_ADDR" "hello from ci $$"
check "message delivered into the Maildir in the volume" \
  bash -c "for i in \$(seq 60); do podman exec '$CNAME' grep -rl 'hello from ci $$' /data/mail/$DOMAIN/alice/new /data/mail/$DOMAIN/alice/cur && exit 0; sleep 0.25; done; podman exec '$CNAME' mailstack queue list; exit 1"
check "submission over implicit TLS (465) with AUTH, certificate verified" \
  "${PROBE[@]}" send-submission "$P465" "$WORK/cert.pem" "$MAILHOST" "$USER_ADDR" "$USER_PW" "submitted from ci $$"
check "both messages read back over IMAPS (993), certificate verified" \
  "${PROBE[@]}" imap-read "$P993" "$WORK/cert.pem" "$MAILHOST" "$USER_ADDR" "$USER_PW" "hello from ci $$" "submitted from ci $$"
# The README's quick-start command, with curl as the mail client.
if command -v curl >/dev/null; then
  check "README's curl command reads the first message over IMAPS" \
    bash -c "curl -sS --max-time 30 --cacert '$WORK/cert.pem' --resolve $MAILHOST:$P993:127.0.0.1 \
               --user '$USER_ADDR:$USER_PW' 'imaps://$MAILHOST:$P993/INBOX;UID=1' | tee '$WORK/curl.txt' | grep -E '^(Subject|Received):'
             grep -q 'body of hello from ci $$' '$WORK/curl.txt'"
else
  t "note: curl is not installed; the README's curl command is not checked"
fi
check "podman healthcheck run: healthy" bash -c "podman healthcheck run '$CNAME' && echo healthy"
check "mailstack status: every listener up, queue sizes, certificate expiry" \
  bash -c "podman exec '$CNAME' mailstack status >'$WORK/status.txt'; cat '$WORK/status.txt'; \
           grep -qE '^ +smtp +0\.0\.0\.0:25 +up' '$WORK/status.txt' && grep -qE '^ +imaps +0\.0\.0\.0:993 +up' '$WORK/status.txt' \
           && ! grep -q DOWN '$WORK/status.txt' && grep -q '^queue: incoming' '$WORK/status.txt' \
           && grep -qE '^certificate: /data/tls/cert.pem, expires 20' '$WORK/status.txt'"
check "nothing in /data is readable by other users" \
  bash -c "out=\$(podman exec '$CNAME' find /data -perm /o=rwx); [ -z \"\$out\" ] || { echo \"\$out\"; exit 1; }"

# Replace the certificate on disk (as an operator copying in real ones would), then SIGHUP.
cert_reload() {
  podman exec "$CNAME" python -c "
import os, pathlib
from mailstack.tls import make_self_signed
new = pathlib.Path('/data/tls/new'); new.mkdir(mode=0o700, exist_ok=True)
make_self_signed(new / 'cert.pem', new / 'key.pem', '$MAILHOST')
os.replace(new / 'key.pem', '/data/tls/key.pem'); os.replace(new / 'cert.pem', '/data/tls/cert.pem'); new.rmdir()
" || return 1
  podman exec "$CNAME" cat /data/tls/cert.pem > "$WORK/cert-new.pem" || return 1
  local want got i
  want=$("${PROBE[@]}" pem-sha256 "$WORK/cert-new.pem") || return 1
  [ "$want" != "$("${PROBE[@]}" pem-sha256 "$WORK/cert.pem")" ] || { echo "new certificate equals the old"; return 1; }
  podman kill -s HUP "$CNAME" >/dev/null || return 1
  for i in $(seq 50); do
    got=$("${PROBE[@]}" cert-sha256 "$P993") && [ "$got" = "$want" ] && { echo "993 serves $got"; return 0; }
    sleep 0.2
  done
  echo "993 still serves $got, want $want"; return 1
}
check "certificate replaced on disk is served after docker kill -s HUP" cert_reload
check "healthy after the reload" podman healthcheck run "$CNAME"

# docker stop: SIGTERM, then SIGKILL after 10 s (exit 137).  The server is PID 1 and stops at once.
stop_container() {
  local start rc ms
  start=$(date +%s%N)
  podman stop -t 10 "$1" >/dev/null 2>>"$WORK/podman-run.log" || return 1
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  rc=$(podman inspect "$1" --format '{{.State.ExitCode}}')
  echo "stopped in $ms ms, exit code $rc"
  [ "$rc" = 0 ] && [ "$ms" -lt 5000 ]
}
# ... with a mail client connected and idle, as there usually is one.
"${PROBE[@]}" hold-imap "$P993" "$WORK/cert-new.pem" "$MAILHOST" "$USER_ADDR" "$USER_PW" >"$WORK/held.log" 2>&1 &
held=$!
for i in $(seq 100); do grep -q idling "$WORK/held.log" && break; sleep 0.1; done
check "docker stop (SIGTERM) with an IMAP client in IDLE: exit code 0 within 5 s" stop_container "$CNAME"
wait "$held"
check "the idle IMAP client was told * BYE" grep 'ended the session: \* BYE' "$WORK/held.log"
[ "$FAILED" = 0 ] || sed 's/^/    held: /' "$WORK/held.log"
podman logs "$CNAME" > "$WORK/container.log" 2>&1

# The health check asks the server, not "is a process there": same volume, no server.
unhealthy_without_server() {
  podman run -d --pull=never --name "$CNAME-idle" --network none -v "$VOLUME:/data" "$IMAGE" sleep 60 \
    >/dev/null 2>>"$WORK/podman-run.log" || return 1
  local rc=0
  podman exec "$CNAME-idle" mailstack status --quiet || rc=$?
  podman healthcheck run "$CNAME-idle" 2>&1 && rc=0
  podman rm -f -t 0 "$CNAME-idle" >/dev/null 2>&1
  [ "$rc" = 1 ]
}
check "health check fails when no server answers (exit 1)" unhealthy_without_server

# A new container on the same volume (an upgrade: docker rm + docker run) keeps everything.
run_container "$CNAME-2" || fatal "podman run of a second container on the same volume"
CNAME_FIRST=$CNAME CNAME=$CNAME-2
check "second container on the same volume: up, config kept, mail still there" \
  bash -c "${PROBE[*]} banner $P25 && ! podman logs '$CNAME' 2>&1 | grep -q 'first start' \
           && ${PROBE[*]} imap-read $P993 '$WORK/cert-new.pem' $MAILHOST $USER_ADDR '$USER_PW' 'hello from ci $$'"
check "second container stops cleanly too" stop_container "$CNAME"
CNAME=$CNAME_FIRST

t "done (server log of the first container: $WORK/container.log)"
finish
