# mailstack: SMTP (25, 465, 587), IMAP (143, 993), POP3 (110, 995) in one process.
#
#   docker build -t mailstack .
#   docker run -d --name mail -e MAILSTACK_DOMAIN=example.com -e MAILSTACK_HOSTNAME=mail.example.com \
#     -v mailstack-data:/data -p 25:25 -p 465:465 -p 587:587 -p 993:993 -p 995:995 mailstack
#
# All state (config, accounts, queue, Maildirs, certificates) lives in the volume /data.
# podman: `podman build --format docker` (the OCI format drops the HEALTHCHECK) and
# `podman run --sysctl net.ipv4.ip_unprivileged_port_start=0 --network slirp4netns:port_handler=slirp4netns`
# (ports below 1024 for the non-root user; the clients' real addresses kept).
# See README.md, section "Docker".
FROM python:3.12-slim

# A fixed uid/gid, so a host directory bind-mounted on /data can be prepared for it:
#   mkdir data && chown 5025:5025 data
ARG MAILSTACK_UID=5025
RUN groupadd --system --gid "$MAILSTACK_UID" mailstack \
 && useradd --system --uid "$MAILSTACK_UID" --gid mailstack --home-dir /data --no-create-home \
            --shell /usr/sbin/nologin mailstack \
 && install -d -o mailstack -g mailstack -m 0700 /data

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Dependencies (and the build backend) first, in their own layer: a code change then
# rebuilds in seconds, with nothing fetched from PyPI (wheel: older setuptools need it
# for bdist_wheel).
COPY pyproject.toml /src/
RUN python -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb')); \
print('\n'.join(p['project']['dependencies'] + p['build-system']['requires'] + ['wheel']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The package itself (no test or dev dependencies), then drop the sources.
COPY README.md /src/
COPY mailstack /src/mailstack
COPY docker/entrypoint.sh /usr/local/bin/mailstack-entrypoint
RUN pip install --no-build-isolation /src \
 && rm -rf /src \
 && chmod 0755 /usr/local/bin/mailstack-entrypoint

# `docker exec <container> mailstack ...` finds the configuration without --config.
ENV MAILSTACK_CONFIG=/data/config.toml
VOLUME /data
WORKDIR /data
EXPOSE 25 465 587 143 993 110 995 4190

# Not root. Binding ports below 1024 as a non-root user relies on the container's
# net.ipv4.ip_unprivileged_port_start=0, which Docker (>= 20.10) sets by default;
# podman 4.x needs `--sysctl net.ipv4.ip_unprivileged_port_start=0` (README, "Docker").
USER mailstack

# Asks the running server over its control socket: listeners up, queue, certificate.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["mailstack", "status", "--quiet"]

# The entrypoint execs the server, so it is PID 1 and receives `docker stop`'s SIGTERM
# (graceful stop) and `docker kill -s HUP` (reload config, accounts, certificates).
STOPSIGNAL SIGTERM
ENTRYPOINT ["mailstack-entrypoint"]
CMD ["mailstack", "serve"]
