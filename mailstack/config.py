"""config.toml -> validated, typed settings.

The schema below is the single source of truth: validation, defaults, the
effective-settings dump of `mailstack config check` and the README reference are
all driven by it.  Every error names the key (`section.key`) and the reason, in
one line, so a bad configuration stops the start with a message a person can act on.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable


class ConfigError(Exception):
    """A configuration problem; str() is one line that names the key."""


@dataclass(frozen=True)
class Key:
    kind: str  # str | int | float | bool | path | enum | addrs | cidrs | strlist | table
    default: Any
    doc: str
    choices: tuple = ()
    min: float | None = None
    max: float | None = None
    check: Callable[[Any], str | None] | None = field(default=None, compare=False)
    secret: bool = False  # never printed by `config check`


MiB = 1024 * 1024

# Listener defaults: the standard ports on every address.
_LISTENERS = {
    "smtp": ("0.0.0.0:25", "SMTP from the internet (MX); STARTTLS offered, no AUTH needed to receive local mail"),
    "submissions": ("0.0.0.0:465", "submission over implicit TLS (RFC 8314); AUTH required"),
    "submission": ("0.0.0.0:587", "submission; STARTTLS then AUTH required"),
    "imap": ("0.0.0.0:143", "IMAP with STARTTLS"),
    "imaps": ("0.0.0.0:993", "IMAP over implicit TLS"),
    "pop3": ("0.0.0.0:110", "POP3 with STLS"),
    "pop3s": ("0.0.0.0:995", "POP3 over implicit TLS"),
    "managesieve": ("0.0.0.0:4190", "ManageSieve (RFC 5804): users upload their Sieve filters; STARTTLS, "
                    "then AUTHENTICATE PLAIN"),
}

SCHEMA: dict[str, dict[str, Key]] = {
    "server": {
        "hostname": Key("str", "", "Fully qualified name of this host: used in banners, HELO/EHLO, Received: "
                        "and the self-signed certificate. Empty = the system's FQDN (never `localhost`; "
                        "when the system has no FQDN the start log and `mailstack dns` say so)."),
        "data_dir": Key("path", "data", "Where all state lives: queue, Maildirs, accounts, certificates. "
                        "A relative path is relative to this file's folder."),
        "user": Key("str", "mailstack", "When started as root: the unprivileged user to switch to after "
                    "binding ports and reading keys (empty = mailstack); a missing `mailstack` user is "
                    "created as a system account at the first start. \"root\" = keep running as root "
                    "(not recommended)."),
        "log_level": Key("enum", "info", "Least severe log level written to stderr.",
                         choices=("debug", "info", "warning", "error")),
        "log_format": Key("enum", "text", "Log line format: one event per line, plain text or JSON.",
                          choices=("text", "json")),
        "shutdown_grace": Key("float", 10.0, "Seconds that open sessions get to finish on SIGTERM/SIGINT "
                              "before they are closed.", min=0, max=600),
        "event_loop": Key("enum", "auto", "Event loop: `auto` uses uvloop when it is installed, else asyncio's.",
                          choices=("auto", "uvloop", "asyncio")),
        "control_socket": Key("path", "", "Unix socket the CLI uses to act on the running server "
                              "(mode 0600). Empty = <data_dir>/control.sock."),
        "background_index": Key("bool", True, "After the start, index in the background the mail that "
                                "arrived behind the server's back (copied or restored into the Maildirs "
                                "while it was down, moved in by hand), one mailbox at a time and waiting "
                                "while the server is busy, so a user's first login after a migration is "
                                "as fast as the next ones. false = such mail is indexed when a client "
                                "first asks for it."),
        "mailbox_cache_messages": Key("int", 50000, "Messages, summed over the mailboxes no session has "
                                      "open, whose listings the server keeps loaded for the next login, "
                                      "delivery or STATUS (~0.6-1.5 KB each). Past it the least recently "
                                      "used mailboxes are let go and read back from disk when opened again "
                                      "(a rescan of the folder, the index parsed at the first header "
                                      "search); the one a client has just left stays, however big, until "
                                      "another is loaded. 0 = keep only that one.",
                                      min=0, max=100_000_000),
    },
    "listen": {name: Key("addrs", [addr], doc) for name, (addr, doc) in _LISTENERS.items()},
    "tls": {
        "cert": Key("path", "", "PEM certificate chain. Empty = <data_dir>/tls/cert.pem, created self-signed "
                    "on first start if missing."),
        "key": Key("path", "", "PEM private key for `cert`. Empty = <data_dir>/tls/key.pem."),
        "min_version": Key("enum", "TLSv1.2", "Oldest TLS version accepted by every listener.",
                           choices=("TLSv1.2", "TLSv1.3")),
    },
    "smtp": {
        "max_message_size": Key("int", 25 * MiB, "Largest message accepted, in bytes (advertised as SIZE).",
                                min=1024, max=2**31),
        "max_recipients": Key("int", 1000, "Recipients per message; more get 452 4.5.3.", min=1, max=100000),
        "max_line_length": Key("int", 4096, "Longest line of message text, in bytes including CRLF "
                               "(RFC 5321 asks for 1000; real mail sometimes exceeds it).",
                               min=1000, max=1 * MiB),
        "max_connections": Key("int", 200, "Concurrent SMTP sessions across all SMTP listeners; more get "
                               "421 4.7.0.", min=1, max=100000),
        "max_connections_per_ip": Key("int", 20, "Concurrent SMTP sessions from one client address.",
                                      min=1, max=100000),
        "command_timeout": Key("float", 300.0, "Seconds a client may stay silent between commands "
                               "(RFC 5321 4.5.3.2.7 asks for at least 5 minutes).", min=1, max=3600),
        "max_session_time": Key("float", 3600.0, "Seconds one SMTP session may last in total.", min=1,
                                max=86400),
        "max_data_in_flight": Key("int", 256 * MiB, "Bytes of DATA held in memory across all sessions at "
                                  "once; a session that would exceed it gets 451 4.3.1 and may retry.",
                                  min=1 * MiB, max=2**40),
        "bare_lf": Key("enum", "reject", "What to do with a bare LF or bare CR in commands or message text: "
                       "`reject` answers 5xx (as mox does); `normalize` turns it into CRLF (as Postfix 3.9). "
                       "Either way only <CR><LF>.<CR><LF> ends DATA.", choices=("reject", "normalize")),
        "trusted_networks": Key("cidrs", [], "Client networks allowed to relay without AUTH (Postfix's "
                                "mynetworks). Empty = nobody: only authenticated users relay. A network "
                                "covering every address (0.0.0.0/0, ::/0) is refused: an open relay.",
                                check=lambda nets: next((f"{n} covers every address: that makes an open relay"
                                                         for n in nets if n.prefixlen == 0), None)),
        "max_errors": Key("int", 10, "Protocol errors tolerated in one session before 421 and disconnect.",
                          min=1, max=1000),
    },
    "imap": {
        "allow_plaintext_auth": Key("bool", False, "Allow LOGIN/AUTHENTICATE before TLS. Leave off."),
        "idle_timeout": Key("float", 1800.0, "Seconds of silence (and of IDLE) before autologout; "
                            "RFC 3501 asks for at least 30 minutes.", min=30, max=86400),
        "max_line_length": Key("int", 65536, "Longest command line, in bytes, literals excluded.",
                               min=1024, max=16 * MiB),
        "max_connections": Key("int", 20000, "Concurrent IMAP sessions.", min=1, max=1000000),
        "max_connections_per_ip": Key("int", 50, "Concurrent IMAP sessions from one client address.",
                                      min=1, max=1000000),
        "idle_refresh": Key("float", 30.0, "Seconds between looks at the mailbox during IDLE, to notice "
                            "changes made by other programs (in-process deliveries are pushed at once).",
                            min=0.05, max=3600),
    },
    "pop3": {
        "allow_plaintext_auth": Key("bool", False, "Allow USER/PASS and AUTH before TLS. Leave off."),
        "idle_timeout": Key("float", 600.0, "Seconds of silence before the session is closed; RFC 1939 "
                            "asks for at least 10 minutes.", min=1, max=86400),
        "max_connections": Key("int", 1000, "Concurrent POP3 sessions.", min=1, max=1000000),
        "max_connections_per_ip": Key("int", 20, "Concurrent POP3 sessions from one client address.",
                                      min=1, max=1000000),
        "max_line_length": Key("int", 4096, "Longest command line in bytes, CRLF included (RFC 2449 asks "
                               "for 255; AUTH PLAIN responses can be longer).", min=512, max=1 * MiB),
        "max_commands": Key("int", 1000000, "Commands one session may send before it is closed.",
                            min=10, max=2**31),
        "max_errors": Key("int", 20, "Malformed or unknown commands tolerated in one session before "
                          "-ERR and disconnect.", min=1, max=10000),
    },
    "proxy": {
        "trusted": Key("cidrs", [], "Addresses of proxies (HAProxy, Traefik, Docker's proxy) whose connections "
                       "must start with a PROXY protocol v1 or v2 header giving the real client address; "
                       "empty = off (turning it on or off takes a restart)."),
        "timeout": Key("float", 5.0, "Seconds a trusted proxy may take to send the PROXY header before the "
                       "connection is closed.", min=0.1, max=300),
    },
    "auth": {
        "fail_delay": Key("float", 1.0, "Delay after a failed login; it doubles with each further failure "
                          "from the same address or for the same account.", min=0, max=60),
        "fail_delay_max": Key("float", 30.0, "Cap on the failed-login delay, in seconds.", min=0, max=600),
        "fail_window": Key("float", 900.0, "Seconds after which failures are forgotten.", min=1, max=86400),
        # --- defence (mailstack/defense): login guessing, shared by every protocol ---
        "max_parallel": Key("int", 3, "Logins from one address (one /64 for IPv6) being checked at once, all "
                            "protocols together; more wait their turn (up to twice fail_delay_max, at least "
                            "5 s), then are answered \"try later\".", min=1, max=1000),
        "block_after": Key("int", 10, "Failed logins from one address within fail_window after which that "
                           "address is refused on every protocol for block_time. 0 = never block.",
                           min=0, max=100000),
        "block_time": Key("float", 900.0, "Seconds an address stays blocked after block_after failures.",
                          min=1, max=7 * 86400),
    },
    "defense": {
        "exempt_networks": Key("cidrs", ["127.0.0.1/32", "::1/128"], "Clients never checked by DNSBL, pregreet, "
                               "HELO/rDNS, greylisting or the per-address rate limits (Postfix's mynetworks "
                               "exceptions); smtp.trusted_networks are exempt too. Authenticated users keep "
                               "their per-user limits."),
        "dnsbl_sites": Key("strlist", [], "DNS block and allow lists asked at connect on port 25, Postfix "
                           "postscreen syntax: \"domain[=filter][*weight]\", e.g. \"zen.spamhaus.org*3\", "
                           "\"bl.example=127.0.0.[2..11]*2\"; a negative weight makes it an allow list "
                           "(DNSWL: \"list.dnswl.org=127.0.[0..255].[1..3]*-2\"). Empty = off.",
                           check=lambda v: _check_dnsbl_sites(v)),
        "dnsbl_threshold": Key("int", 1, "Sum of the weights of the lists that list a client at which it is "
                               "refused (554 5.7.1 at RCPT).", min=1, max=1000),
        "dnsbl_timeout": Key("float", 3.0, "Seconds the DNS list lookups may take; a list that does not answer "
                             "in time counts as not listing.", min=0.1, max=60),
        "greet_delay": Key("float", 0.0, "Seconds port 25 waits before its banner; a client that talks first "
                           "(pregreet) is refused. A client that passed is not delayed again for a day. "
                           "0 = off; 1-6 is usual (Postfix postscreen_greet_wait).", min=0, max=30),
        "pipelining_check": Key("enum", "log", "A client that sends commands ahead of the replies before "
                                "PIPELINING was offered (after HELO, or before the EHLO reply) is a bot taking "
                                "a shortcut: `off`, `log` it, or `reject` (550 5.5.1 at RCPT).",
                                choices=("off", "log", "reject")),
        "helo_check": Key("enum", "log", "HELO/EHLO name must be a dotted host name or an address literal and "
                          "not our own name: `off`, `log` it, or `reject` (550 5.7.1 at RCPT).",
                          choices=("off", "log", "reject")),
        "rdns_check": Key("enum", "off", "Client address must have a reverse name that resolves back to it: "
                          "`off`, `log` it, or `reject` (450 4.7.25 at RCPT).", choices=("off", "log", "reject")),
        "greylist": Key("bool", False, "Greylist unknown (client /24 or /64, sender, recipient) triplets on port "
                        "25 with 451 4.7.1. Off by default: it delays a new correspondent's first mail by "
                        "greylist_delay or more; turn it on where bot spam outweighs that."),
        "greylist_delay": Key("float", 300.0, "Seconds before a retry of a greylisted triplet is accepted.",
                              min=0, max=86400),
        "greylist_max_age": Key("float", 86400.0, "Seconds within which the retry must come; later, the "
                                "triplet starts over.", min=60, max=30 * 86400),
        "greylist_pass_ttl": Key("float", 35 * 86400.0, "Seconds a triplet that passed stays known.",
                                 min=3600, max=366 * 86400),
        "greylist_auto_allow": Key("int", 5, "Triplets a client network must pass before all its mail is "
                                   "accepted without greylisting. 0 = never.", min=0, max=10000),
        "greylist_exempt_networks": Key("cidrs", [], "Client networks never greylisted."),
        "greylist_spf_domains": Key("strlist", [], "Sender domains never greylisted when SPF passes for them "
                                    "(e.g. big providers that retry from other addresses)."),
        "max_connections_per_minute": Key("int", 60, "New SMTP connections from one client address per minute; "
                                          "more get 421 4.7.0. 0 = no limit.", min=0, max=1000000),
        "max_messages_per_minute": Key("int", 60, "Messages (MAIL) from one client address per minute; more get "
                                       "451 4.7.0. 0 = no limit.", min=0, max=1000000),
        "max_recipients_per_minute": Key("int", 300, "Recipients (RCPT) from one client address per minute; more "
                                         "get 451 4.7.0. 0 = no limit.", min=0, max=1000000),
        "max_failed_recipients_per_minute": Key("int", 20, "Unknown recipients from one client address per "
                                                "minute before further RCPTs get 451 4.7.0 (stops directory "
                                                "harvesting). 0 = no limit.", min=0, max=1000000),
        "user_messages_per_hour": Key("int", 1000, "Messages one authenticated user may send per hour; more "
                                      "get 451 4.7.0. 0 = no limit.", min=0, max=10000000),
        "user_recipients_per_hour": Key("int", 5000, "Recipients one authenticated user may send to per hour; "
                                        "more get 451 4.7.0. 0 = no limit.", min=0, max=10000000),
        "outbound_messages_per_minute": Key("int", 600, "Deliveries to one destination (next hop) per minute; "
                                            "the rest wait or are deferred. 0 = no limit.", min=0, max=1000000),
        "login_timeout": Key("float", 60.0, "Seconds an IMAP or POP3 client may stay silent before logging in.",
                             min=1, max=3600),
        "stress_at": Key("float", 0.75, "Share of a listener's max_connections in use at which it is under "
                         "stress: sessions not yet past login (IMAP/POP3) or MAIL (SMTP) then get only "
                         "stress_timeout of silence, and at the limit the longest-idle of them makes room "
                         "for a new client.", min=0.1, max=1.0),
        "stress_timeout": Key("float", 10.0, "Seconds of silence allowed before login/MAIL under stress "
                              "(Postfix's smtpd_timeout under stress).", min=1, max=3600),
        "state_file": Key("path", "", "SQLite file for state that must survive a restart (greylist triplets, "
                          "allow-lists). Empty = <data_dir>/defense.sqlite."),
    },
    "accounts": {
        "postmaster": Key("str", "", "Account (or alias) that receives mail for postmaster@ and abuse@ every "
                          "local domain, the bare `postmaster`, and root/postmaster/MAILER-DAEMON@localhost "
                          "or @server.hostname (RFC 5321 4.5.1, RFC 2142). Empty = the first account made; "
                          "an explicit alias of those names still wins."),
        "min_password_length": Key("int", 12, "Shortest password `mailstack user add/passwd` accepts; the most "
                                   "common passwords are refused whatever their length (`--allow-weak` "
                                   "overrides both, for tests).", min=1, max=1024),
    },
    "sendmail": {
        "trusted_users": Key("strlist", [], "Local users who may choose the envelope sender with `sendmail -f` "
                             "(or MAIL FROM in `sendmail -bs`), besides root and server.user; everyone else "
                             "sends as user@server.hostname."),
    },
    "queue": {
        "retry_min": Key("float", 300.0, "First retry delay for a deferred message, in seconds "
                         "(Postfix minimal_backoff_time).", min=0.01, max=86400),
        "retry_max": Key("float", 4000.0, "Longest retry delay; the delay doubles up to this "
                         "(Postfix maximal_backoff_time).", min=0.01, max=604800),
        "max_lifetime": Key("float", 5 * 86400.0, "Seconds a message may stay queued before it bounces "
                            "(Postfix maximal_queue_lifetime).", min=1, max=100 * 86400),
        "local_concurrency": Key("int", 20, "Messages delivered into Maildirs at once.", min=1, max=1000),
        "remote_concurrency": Key("int", 100, "Messages handed to the outbound SMTP client at once "
                                  "(connections are limited by delivery.max_connections).",
                                  min=1, max=1000),
    },
    "delivery": {
        "plus_separator": Key("str", "+", "Recipient delimiter: user+tag@domain is delivered to user@domain. "
                              "Empty = off."),
        "outbound": Key("bool", True, "Deliver mail for remote recipients over SMTP (MX, relayhost or "
                        "transports). Off = no SMTP client: remote recipients stay deferred."),
        "relayhost": Key("str", "", "Send all remote mail through this host (Postfix relayhost): \"[host]:port\" "
                         "connects to host directly, \"host\" looks up its MX first. Empty = MX routing.",
                         check=lambda v: _nexthop_error(v) if v else None),
        "relayhost_username": Key("str", "", "AUTH user name for the relayhost (sent only over TLS). "
                                  "Empty = no AUTH."),
        "relayhost_password": Key("str", "", "AUTH password for the relayhost (never printed by "
                                  "`config check`; keep this file mode 0600).", secret=True),
        "relayhost_implicit_tls": Key("bool", False, "Speak TLS to the relayhost from the first byte (port "
                                      "465, RFC 8314) instead of STARTTLS (Postfix smtp_tls_wrappermode); "
                                      "the certificate is checked only with tls_security_level = verify."),
        "transports": Key("table", {}, "Per-domain next hop overriding relayhost and MX, e.g. "
                          "{ \"example.org\" = \"[10.0.0.5]:25\" } (Postfix transport_maps).",
                          check=lambda t: next(filter(None, (_nexthop_error(v, k) for k, v in t.items())), None)),
        "port": Key("int", 25, "TCP port for next hops that name none: MX hosts of recipient domains, "
                    "relayhost or transports without \":port\" (Postfix smtp_tcp_port).", min=1, max=65535),
        "tls_security_level": Key("enum", "may", "STARTTLS policy of the SMTP client (Postfix "
                                  "smtp_tls_security_level): none, may (opportunistic, unverified), encrypt "
                                  "(TLS required, unverified), verify (TLS required, certificate and MX host "
                                  "name checked).", choices=("none", "may", "encrypt", "verify")),
        "tls_ca_file": Key("path", "", "PEM CA certificates trusted by `verify`. Empty = the system's CA store."),
        "helo_name": Key("str", "", "Name sent in EHLO/HELO. Empty = server.hostname."),
        "connect_timeout": Key("float", 30.0, "Seconds to wait for a TCP connection and the greeting "
                               "(Postfix smtp_connect_timeout).", min=0.1, max=3600),
        "command_timeout": Key("float", 300.0, "Seconds to wait for the reply to a command, and for each "
                               "chunk of message text to be sent (Postfix smtp_*_timeout).", min=0.1, max=3600),
        "data_timeout": Key("float", 600.0, "Seconds to wait for the reply after the final \".\" "
                            "(Postfix smtp_data_done_timeout).", min=0.1, max=3600),
        "destination_concurrency": Key("int", 20, "Deliveries in progress at once to one destination "
                                       "(Postfix default_destination_concurrency_limit).", min=1, max=10000),
        "max_connections": Key("int", 100, "Outbound SMTP deliveries in progress at once, all destinations "
                               "together (Postfix default_process_limit).", min=1, max=100000),
        "destination_recipient_limit": Key("int", 50, "Recipients per SMTP transaction (Postfix "
                                           "default_destination_recipient_limit).", min=1, max=100000),
        "connection_cache_time": Key("float", 2.0, "Seconds an idle connection is kept for the next message "
                                     "to the same destination; 0 = no reuse (Postfix "
                                     "smtp_connection_cache_time_limit).", min=0, max=300),
        "connection_reuse_time": Key("float", 300.0, "Seconds after which a connection is no longer reused "
                                     "(Postfix smtp_connection_reuse_time_limit).", min=1, max=86400),
        "mx_address_limit": Key("int", 5, "Server addresses tried per delivery attempt, over all MX hosts "
                                "(Postfix smtp_mx_address_limit).", min=1, max=100),
        "inet_protocols": Key("enum", "all", "Address families used to reach remote servers; `all` tries "
                              "IPv4 addresses before IPv6.", choices=("all", "ipv4", "ipv6")),
    },
    "dns": {
        "nameservers": Key("strlist", [], "Resolvers to ask, as \"host\" or \"host:port\" (\"[::1]:53\"). "
                           "Empty = those of /etc/resolv.conf.",
                           check=lambda v: next(filter(None, (_nameserver_error(x) for x in v)), None)),
        "timeout": Key("float", 10.0, "Seconds one DNS lookup may take over all tries; a timeout defers "
                       "delivery.", min=0.1, max=300),
    },
    "dkim": {
        "enabled": Key("bool", True, "Sign outbound mail whose From: domain has a key in <data_dir>/dkim/."),
        "selector": Key("str", "mail", "Selector used by `mailstack dkim keygen` and preferred when signing "
                        "(key file <data_dir>/dkim/<domain>.<selector>.key).",
                        check=lambda v: None if v and v.isascii() and all(c.isalnum() or c in "-_" for c in v)
                        else "must be letters, digits, '-' or '_'"),
    },
    "senderauth": {
        "enabled": Key("bool", True, "Check SPF, DKIM, ARC and DMARC of mail received on port 25, add an "
                       "Authentication-Results header (also `auth=pass` for submission) and remove forged ones "
                       "that carry server.hostname as their authserv-id."),
        "spf_reject": Key("bool", False, "Refuse at MAIL FROM when SPF says `fail` (550 5.7.23) and say 451 "
                          "4.7.24 on a DNS `temperror`. Off: SPF is only recorded and DMARC decides."),
        "dmarc_policy": Key("enum", "enforce", "What to do with the policy of a domain whose DMARC check fails: "
                            "enforce (p=reject refused with 550 5.7.1 before the message is accepted, "
                            "p=quarantine delivered into Junk), quarantine (a reject policy also only goes to "
                            "Junk), monitor (only recorded).", choices=("enforce", "quarantine", "monitor")),
        "allow": Key("strlist", [], "Domains (of the From: or MAIL FROM address) and client addresses or networks "
                     "(\"192.0.2.0/24\") whose mail skips SPF refusal and DMARC enforcement. Results are still "
                     "recorded.", check=lambda v: next(filter(None, (_allow_error(x) for x in v)), None)),
        "arc_trusted": Key("strlist", [], "Domains of forwarders and mailing lists whose valid ARC seal (d= of the "
                           "newest ARC-Seal) overrides a DMARC failure, as large providers do for lists.",
                           check=lambda v: next((f"{x!r} is not a domain name" for x in v
                                                 if not x or "." not in x or any(c.isspace() or c in "@/:[]" for c in x)),
                                                None)),
        "dns_timeout": Key("float", 8.0, "Seconds all DNS lookups for one check (SPF at MAIL FROM; DKIM, ARC, "
                           "DMARC at the end of DATA) may take together; what is not answered by then is a "
                           "temperror.", min=0.1, max=120),
        "dkim_min_rsa_bits": Key("int", 1024, "RSA DKIM keys shorter than this are not accepted (RFC 8301).",
                                 min=512, max=8192),
        "arc_seal": Key("bool", True, "ARC-seal mail received from the internet that is forwarded to remote "
                        "addresses, with the DKIM key of server.hostname's domain (or of the first local domain "
                        "that has one)."),
        "srs": Key("bool", True, "Rewrite the envelope sender of forwarded mail (sender outside the local "
                   "domains, recipient remote) to an SRS0 address, so SPF passes at the next hop; bounces to "
                   "SRS addresses go back to the original sender. Key: <data_dir>/srs.key."),
        "srs_domain": Key("str", "", "Domain of the SRS addresses. Empty = server.hostname (which then needs an "
                          "MX or A record and an SPF record allowing this host)."),
        "srs_max_age": Key("int", 21, "Days an SRS address stays valid for bounces (libsrs2's default).",
                           min=1, max=1000),
    },
    # --- content filters (mailstack/filters) ---------------------------------------------
    "filters": {
        "order": Key("strlist", ["milters", "clamd", "rspamd", "spamd"], "Order in which the configured "
                     "filters see a message at the end of DATA (a filter without an address is left out): "
                     "`milters` (all of `milters`, in their order), `clamd`, `rspamd`, `spamd`. The first "
                     "reject, tempfail, discard or quarantine ends the chain.",
                     check=lambda v: _filters_order_error(v)),
        "listeners": Key("strlist", ["smtp"], "SMTP listeners whose mail is filtered: `smtp` (inbound), "
                         "`submission`, `submissions` (mail of your own users).",
                         check=lambda v: next((f"unknown listener {x!r}" for x in v
                                               if x not in ("smtp", "submission", "submissions")), None)),
        "max_size": Key("int", 10 * MiB, "Messages larger than this many bytes skip content scanning "
                        "(logged as filters=skipped); milters get an abort for them.", min=1024, max=2**31),
        "milters": Key("strlist", [], "Milters (Sendmail/Postfix milter protocol 6), in order: "
                       "\"inet:HOST:PORT\" or \"unix:/PATH\", optionally followed by per-milter settings, "
                       "e.g. \"inet:127.0.0.1:8891 default_action=accept command_timeout=10\".",
                       check=lambda v: _milters_error(v)),
        "milter_default_action": Key("enum", "tempfail", "What a milter that is down, slow or broken "
                                     "means (Postfix's milter_default_action): `tempfail` answers 451 4.7.1, "
                                     "`accept` carries on without it, `reject` answers 550 5.7.1.",
                                     choices=("tempfail", "accept", "reject")),
        "milter_connect_timeout": Key("float", 30.0, "Seconds to connect to a milter and negotiate.",
                                      min=0.1, max=3600),
        "milter_command_timeout": Key("float", 30.0, "Seconds a milter may take to answer one command.",
                                      min=0.1, max=3600),
        "milter_content_timeout": Key("float", 300.0, "Seconds a milter may take over the end of the "
                                      "message (after each progress report the time starts again).",
                                      min=0.1, max=3600),
        "rspamd_url": Key("str", "", "rspamd's normal worker, e.g. \"http://127.0.0.1:11333\" "
                          "(POST /checkv2). Empty = off.", check=lambda v: _url_error(v)),
        "rspamd_controller": Key("str", "", "rspamd's controller for learning from Junk moves, e.g. "
                                 "\"http://127.0.0.1:11334\". Empty = no learning through rspamd.",
                                 check=lambda v: _url_error(v)),
        "rspamd_password": Key("str", "", "The controller's password (rspamd's `password`/`enable_password`); "
                               "empty when rspamd trusts this host (secure_ip).", secret=True),
        "rspamd_timeout": Key("float", 20.0, "Seconds rspamd may take for one message.", min=0.1, max=3600),
        "rspamd_default_action": Key("enum", "tempfail", "When rspamd gives no answer: `tempfail` (451 "
                                     "4.7.1, the sender retries) or `accept`.", choices=("tempfail", "accept")),
        "spamd_address": Key("str", "", "SpamAssassin's spamd: \"HOST:PORT\" (e.g. \"127.0.0.1:783\") or "
                             "\"unix:/PATH\". Empty = off.", check=lambda v: _spamd_clamd_error(v)),
        "spamd_user": Key("str", "", "User name sent to spamd (its per-user settings and Bayes database); "
                          "empty = spamd's own user."),
        "spamd_timeout": Key("float", 30.0, "Seconds spamd may take for one message.", min=0.1, max=3600),
        "spamd_default_action": Key("enum", "tempfail", "When spamd gives no answer: `tempfail` or `accept`.",
                                    choices=("tempfail", "accept")),
        "spamd_reject_score": Key("float", 0.0, "Score at or above which spamd's verdict refuses the "
                                  "message (554 5.7.1); below it spam goes to the Junk folder. 0 = never "
                                  "refuse.", min=0, max=10000),
        "clamd_address": Key("str", "", "ClamAV's clamd: \"HOST:PORT\" (e.g. \"127.0.0.1:3310\") or "
                             "\"unix:/PATH\" (e.g. \"unix:/run/clamav/clamd.ctl\"). Empty = off.",
                             check=lambda v: _spamd_clamd_error(v)),
        "clamd_timeout": Key("float", 60.0, "Seconds clamd may take for one message.", min=0.1, max=3600),
        "clamd_default_action": Key("enum", "tempfail", "When clamd gives no answer: `tempfail` or `accept`.",
                                    choices=("tempfail", "accept")),
        "learn": Key("enum", "auto", "Where a message a user moves into Junk (spam) or out of Junk to anything "
                     "but Trash (ham) is reported: `rspamd` (the controller), `spamd` (TELL; spamd needs "
                     "--allow-tell), `auto` (rspamd if rspamd_controller is set, else spamd if spamd_address is "
                     "set), `off`.", choices=("auto", "rspamd", "spamd", "off")),
        "learn_retries": Key("int", 3, "Attempts to report one message before giving up (logged); attempts "
                             "are spaced 1, 2, 4 ... seconds apart.", min=1, max=10),
    },
    # --- sieve / managesieve (issue 15) ------------------------------------------------
    "sieve": {  # sieve.before/after must name a script that compiles: checked at start, not at a delivery
        "enabled": Key("bool", True, "Run users' Sieve filters (and the global ones) at local delivery."),
        "before": Key("path", "", "A global Sieve script run for every account before the user's own "
                      "(Pigeonhole's sieve_before). Empty = none.",
                      check=lambda v: __import__("mailstack.sieve.scripts", fromlist=["_"]).global_script_error(v)),
        "after": Key("path", "", "A global Sieve script run for every account after the user's own "
                     "(Pigeonhole's sieve_after). Empty = none.",
                     check=lambda v: __import__("mailstack.sieve.scripts", fromlist=["_"]).global_script_error(v)),
        "max_script_size": Key("int", 64 * 1024, "Largest Sieve script, in bytes.", min=1024, max=16 * MiB),
        "max_scripts": Key("int", 20, "Sieve scripts one account may store.", min=1, max=10000),
        "max_steps": Key("int", 10000, "Commands and tests one delivery may evaluate (across every "
                         "script); more is a run-time error and the message goes to INBOX.", min=100,
                         max=10_000_000),
        "max_actions": Key("int", 32, "Actions one delivery may take (fileinto, redirect, ...).", min=1, max=1000),
        "max_redirects": Key("int", 4, "Redirects one delivery may make.", min=0, max=100),
        "max_include_depth": Key("int", 5, "How deep `include` may nest.", min=1, max=50),
        "vacation_min_period": Key("float", 86400.0, "Shortest time between two vacation replies to one "
                                   "sender, in seconds; a shorter :days/:seconds is raised to it.",
                                   min=0, max=90 * 86400),
        "vacation_max_period": Key("float", 90 * 86400.0, "Longest time between two vacation replies to one "
                                   "sender, in seconds.", min=0, max=365 * 86400),
    },
    "managesieve": {
        "max_connections": Key("int", 1000, "Concurrent ManageSieve sessions.", min=1, max=100000),
        "max_connections_per_ip": Key("int", 20, "Concurrent ManageSieve sessions from one address.",
                                      min=1, max=100000),
        "idle_timeout": Key("float", 1800.0, "Seconds of silence before the session is closed.",
                            min=10, max=86400),
        "max_line_length": Key("int", 8192, "Longest command line, in bytes, literals excluded.",
                               min=1024, max=1 * MiB),
    },
    "quota": {
        "default_storage": Key("str", "10G", "Storage limit of an account without its own (`mailstack user "
                               "quota USER SIZE`): a size with K, M, G or T (powers of 1024); 0 = no limit. "
                               "Generous on purpose: it keeps one flooded or looping mailbox from filling the "
                               "disk for everyone, yet is far above what a person's mail needs (Gmail's whole "
                               "account is 15G). Mail to a full mailbox is refused with 452 4.2.2 (senders "
                               "retry) or deferred in the queue, never lost.",
                               check=lambda v: _size_error(v)),
        "default_messages": Key("int", 0, "Message-count limit of an account without its own; 0 = no limit.",
                                min=0, max=2**31),
        "warn_percent": Key("int", 90, "When an account's usage (storage or messages, whichever is fuller) "
                            "crosses this percentage of its limit, a warning from the postmaster is put in its "
                            "INBOX, once per crossing (again only after usage fell below and crossed anew). "
                            "0 = no warning.", min=0, max=100),
    },
    "metrics": {
        "listen": Key("str", "", "Serve Prometheus metrics (GET /metrics) on this \"host:port\", e.g. "
                      "\"127.0.0.1:9100\". Keep it on loopback or a private network: it is plain HTTP "
                      "without authentication. Empty = off.",
                      check=lambda v: _hostport_error(v) if v else None),
    },
}


def _size_error(value: str) -> str | None:
    from .store.quota import parse_size
    try:
        parse_size(value)
    except ValueError as e:
        return str(e)
    return None


# --- checks of the [filters] block -------------------------------------------------------------
def _filters_order_error(names: list[str]) -> str | None:
    known = ("milters", "clamd", "rspamd", "spamd")
    for name in names:
        if name not in known:
            return f"unknown filter {name!r} (known: {', '.join(known)})"
    if len(set(names)) != len(names):
        return "a filter is listed twice"
    return None


def _milters_error(specs: list[str]) -> str | None:
    from .filters.milter.client import parse_milter
    for spec in specs:
        try:
            parse_milter(spec, {"default_action": "tempfail", "connect_timeout": 1.0, "command_timeout": 1.0,
                                "content_timeout": 1.0})
        except ValueError as e:
            return str(e)
    return None


def _url_error(url: str) -> str | None:
    if not url:
        return None
    from .filters.http import parse_url
    try:
        parse_url(url)
    except ValueError as e:
        return str(e)
    return None


def _spamd_clamd_error(address: str) -> str | None:
    if not address or (address.startswith("unix:/") and len(address) > 6):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"{address!r}: expected HOST:PORT or unix:/PATH"
    return None


class _Section(SimpleNamespace):
    def as_dict(self) -> dict:
        return dict(vars(self))


def _check_value(name: str, key: Key, value: Any, base: Path) -> Any:
    """Convert and validate one value; raise ConfigError naming `name`."""

    def bad(reason: str) -> ConfigError:
        return ConfigError(f"{name}: {reason}")

    kind = key.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad(f"must be true or false, got {value!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"must be a whole number, got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"must be a number, got {value!r}")
        value = float(value)
    elif kind in ("str", "enum", "path"):
        if not isinstance(value, str):
            raise bad(f"must be a string, got {value!r}")
        if "\x00" in value:
            raise bad("must not contain NUL")
        if kind == "enum" and value not in key.choices:
            raise bad(f"must be one of {', '.join(key.choices)}, got {value!r}")
        if kind == "path" and value:
            value = str((base / value).resolve()) if not os.path.isabs(value) else value
    elif kind in ("addrs", "cidrs", "strlist"):
        if isinstance(value, str) and kind == "addrs":
            value = [value] if value else []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(f"must be a list of strings, got {value!r}")
        if kind == "addrs":
            value = [parse_hostport(name, v) for v in value]
        elif kind == "cidrs":
            try:
                value = [ipaddress.ip_network(v, strict=False) for v in value]
            except ValueError as e:
                raise bad(f"not a network address: {e}") from None
    elif kind == "table":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise bad(f"must be a table of strings, got {value!r}")
        value = dict(value)
    else:  # pragma: no cover - schema bug
        raise bad(f"unknown kind {kind}")
    if key.min is not None and value < key.min:
        raise bad(f"must be at least {key.min:g}, got {value!r}")
    if key.max is not None and value > key.max:
        raise bad(f"must be at most {key.max:g}, got {value!r}")
    if key.check is not None:
        reason = key.check(value)
        if reason:
            raise bad(reason)
    return value


def parse_hostport(name: str, text: str) -> tuple[str, int]:
    """'0.0.0.0:25', '[::1]:25', ':25' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name}: {text!r} is not host:port (e.g. \"0.0.0.0:25\" or \"[::1]:25\")")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


@dataclass
class Config:
    """Validated settings. Sections are attributes: cfg.smtp.max_message_size."""

    path: Path | None
    sections: dict[str, _Section]
    # One line to log at start (and print by `mailstack dns`) when the host name had to be
    # guessed and is not a fully qualified domain name.
    hostname_note: str = ""

    def __getattr__(self, item: str) -> _Section:
        try:
            return self.__dict__["sections"][item]
        except KeyError:
            raise AttributeError(item) from None

    # Derived paths, so every module agrees on the layout under data_dir.
    @property
    def data_dir(self) -> Path:
        return Path(self.server.data_dir)

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    @property
    def control_socket(self) -> Path:
        return Path(self.server.control_socket or self.data_dir / "control.sock")


def from_dict(raw: dict, base: Path, path: Path | None = None) -> Config:
    sections: dict[str, _Section] = {}
    for section in raw:
        if section not in SCHEMA:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(SCHEMA)})")
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: must be a table ([{section}])")
        for key in raw[section]:
            if key not in SCHEMA[section]:
                raise ConfigError(f"{section}.{key}: unknown key")
    for section, keys in SCHEMA.items():
        given = raw.get(section, {})
        values = {}
        for key, spec in keys.items():
            name = f"{section}.{key}"
            value = given.get(key, spec.default)
            values[key] = _check_value(name, spec, value, base)
        sections[section] = _Section(**values)
    cfg = Config(path=path, sections=sections)
    if not sections["server"].hostname:
        sections["server"].hostname, cfg.hostname_note = system_hostname()
    _cross_checks(cfg)
    return cfg


def system_hostname() -> tuple[str, str]:
    """(the system's name for this host, a one-line note when it is not a FQDN). Never
    `localhost`: a resolver that maps the host name to 127.0.0.1 makes getfqdn() say that."""
    names = [socket.getfqdn(), socket.gethostname()]
    usable = [n.lower().rstrip(".") for n in names
              if n and n.lower().rstrip(".") not in ("localhost", "localhost.localdomain")]
    fqdn = next((n for n in usable if "." in n), None)
    if fqdn:
        return fqdn, ""
    name = usable[0] if usable else "mailstack.invalid"
    return name, (f"server.hostname: the system's name {name!r} is not a fully qualified domain name; "
                  "set server.hostname (e.g. mail.example.com) before other servers see it")
def _check_dnsbl_sites(sites: list[str]) -> str | None:
    from .defense.dnsbl import parse_site
    for site in sites:
        try:
            parse_site(site)
        except ValueError as e:
            return str(e)
    return None


def _cross_checks(cfg: Config) -> None:
    if cfg.queue.retry_max < cfg.queue.retry_min:
        raise ConfigError("queue.retry_max: must not be smaller than queue.retry_min")
    if cfg.auth.fail_delay_max < cfg.auth.fail_delay:
        raise ConfigError("auth.fail_delay_max: must not be smaller than auth.fail_delay")
    if bool(cfg.tls.cert) != bool(cfg.tls.key):
        raise ConfigError("tls.key: tls.cert and tls.key must be given together")
    seen: dict[tuple[str, int], str] = {}
    for name, addrs in cfg.listen.as_dict().items():
        for addr in addrs:
            if addr[1] != 0 and addr in seen:
                raise ConfigError(f"listen.{name}: {addr[0]}:{addr[1]} is also used by listen.{seen[addr]}")
            seen[addr] = name


def load(path: str | os.PathLike) -> Config:
    """Read and validate a config file. Raises ConfigError (one line, naming the key)."""
    path = Path(path).resolve()
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as e:  # a permission, a directory: one line, as every config error
        raise ConfigError(f"{path}: cannot read it: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_dict(raw, base=path.parent, path=path)


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        items = []
        for v in value:
            if isinstance(v, tuple):
                host = f"[{v[0]}]" if ":" in v[0] else v[0]
                items.append(f'"{host}:{v[1]}"')
            else:
                items.append(f'"{v}"')
        return "[" + ", ".join(items) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = "{v}"' for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _shown(section: str, key: str, value: Any) -> str:
    if SCHEMA[section][key].secret and value:
        return '"********"  # set, not shown'
    return _render(value)


def _differs(cfg: Config, defaults: Config, section: str, key: str) -> bool:
    return _render(getattr(cfg.sections[section], key)) != _render(getattr(defaults.sections[section], key))


def _defaults_for(cfg: Config) -> Config:
    return from_dict({}, base=cfg.path.parent if cfg.path else Path("."))


def dump(cfg: Config, changed_only: bool = False) -> str:
    """Effective settings, defaults included, as TOML (like `postconf`); with changed_only,
    only those that differ from the defaults (like `postconf -n`)."""
    defaults = _defaults_for(cfg) if changed_only else None
    out = []
    for section in SCHEMA:
        keys = [k for k in cfg.sections[section].as_dict()
                if defaults is None or _differs(cfg, defaults, section, k)]
        if changed_only and not keys:
            continue
        out.append(f"[{section}]")
        for key in keys:
            out.append(f"{key} = {_shown(section, key, getattr(cfg.sections[section], key))}")
        out.append("")
    return "\n".join(out)


def dump_keys(cfg: Config, names: list[str], changed_only: bool = False) -> str:
    """`section.key = value` for each name (like `postconf KEY`); ConfigError for an unknown one."""
    defaults = _defaults_for(cfg) if changed_only else None
    out = []
    for name in names:
        section, _, key = name.partition(".")
        if section not in SCHEMA or key not in SCHEMA[section]:
            raise ConfigError(f"{name}: unknown key (`mailstack config reference` lists them)")
        if defaults is None or _differs(cfg, defaults, section, key):
            out.append(f"{name} = {_shown(section, key, getattr(cfg.sections[section], key))}\n")
    return "".join(out)


SECTION_DOCS = {
    "server": "The process: names, where state lives, logging, privileges.",
    "listen": "Listeners: a list of \"host:port\" per protocol; [] turns one off.",
    "tls": "Certificates and TLS versions, shared by every listener.",
    "smtp": "SMTP in (25, 465, 587): limits and policy.",
    "imap": "IMAP (143, 993).",
    "pop3": "POP3 (110, 995).",
    "proxy": "PROXY protocol from trusted proxies in front of every listener.",
    "auth": "Failed-login slow-down, shared by SMTP AUTH, IMAP and POP3.",
    "accounts": "Accounts: the postmaster, password rules.",
    "sendmail": "`sendmail` for every local user (console script and `mailstack sendmail`).",
    "defense": "Defence at the door: DNS lists, pregreet, HELO/rDNS, greylisting, rate limits, floods.",
    "queue": "The queue: retries, lifetime, local delivery.",
    "delivery": "Delivery: addresses and outbound SMTP.",
    "dns": "The resolver used for outbound routing (MX, A/AAAA).",
    "dkim": "DKIM signing of outbound mail from local domains.",
    "senderauth": "Sender authentication of inbound mail (SPF, DKIM, ARC, DMARC) and SRS for forwarding.",
    "filters": "Content filters at the end of DATA: milters, rspamd, SpamAssassin, ClamAV; learning from Junk.",
    "sieve": "Sieve filtering at local delivery (RFC 5228 and extensions).",
    "managesieve": "ManageSieve (RFC 5804, port 4190): where users upload their Sieve scripts.",
    "metrics": "Prometheus metrics over HTTP (off unless `listen` is set).",
    "quota": "Mailbox quotas (Maildir++ maildirsize; IMAP QUOTA, RFC 9208): defaults and the warning mail.",
}


def sample() -> str:
    """A config file with every key, its default and its explanation (the bundled config.toml)."""
    import textwrap

    defaults = from_dict({}, base=Path("."))
    out = ["# mailstack configuration. Every key is listed with its default value and what it does;",
           "# `mailstack config check` validates this file and prints the effective settings.",
           "# Sizes are in bytes, times in seconds.", ""]
    for section, keys in SCHEMA.items():
        out.append(f"# --- {SECTION_DOCS.get(section, section)}")
        out.append(f"[{section}]")
        for key, spec in keys.items():
            for line in textwrap.wrap(spec.doc, 88):
                out.append(f"# {line}")
            value = spec.default
            if spec.kind == "path" or (section == "server" and key == "hostname"):
                value = spec.default  # keep the raw default ("" = derived), not the resolved one
            elif spec.kind in ("addrs", "cidrs"):
                value = [str(v) for v in spec.default]
            else:
                value = getattr(defaults.sections[section], key)
            out.append(f"{key} = {_render(value)}")
            out.append("")
    return "\n".join(out)


def _nexthop_error(value: str, domain: str | None = None) -> str | None:
    from .nexthop import parse_nexthop
    try:
        parse_nexthop(value)
    except ValueError as e:
        return f"{domain}: {e}" if domain else str(e)
    return None


def _hostport_error(value: str) -> str | None:
    try:
        parse_hostport("", value)
    except ConfigError:
        return f"{value!r} is not host:port (e.g. \"127.0.0.1:9100\")"
    return None


def _allow_error(value: str) -> str | None:
    """senderauth.allow: a domain name, an address or a network."""
    try:
        ipaddress.ip_network(value, strict=False)
        return None
    except ValueError:
        pass
    if not value or any(c.isspace() or c in "@/:" for c in value) or "." not in value:
        return f"{value!r} is neither a domain nor an address or network"
    return None


def _nameserver_error(value: str) -> str | None:
    from .nexthop import parse_nameserver
    try:
        parse_nameserver(value)
    except ValueError as e:
        return str(e)
    return None


def reference_markdown() -> str:
    """The README's reference of every key (`mailstack config reference`)."""
    out = []
    for section, keys in SCHEMA.items():
        out.append(f"#### [{section}] — {SECTION_DOCS.get(section, '')}\n")
        out.append("| key | default | meaning |")
        out.append("|---|---|---|")
        for key, spec in keys.items():
            default = spec.default
            if spec.kind in ("addrs", "cidrs"):
                default = [str(v) for v in default]
            shown = _render(default).replace("|", "\\|")
            doc = spec.doc.replace("|", "\\|")
            out.append(f"| `{section}.{key}` | `{shown}` | {doc} |")
        out.append("")
    return "\n".join(out)
