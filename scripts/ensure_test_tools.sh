#!/usr/bin/env bash
# The system tools the end-to-end tests drive as real clients: curl, openssl (OCSP responder,
# s_client) and chromium (mitmweb's page in a real browser), and the real ActiveSync server stack
# behind the gateway (addons/easgate/realstack.py): SOGo + its ActiveSync module, Dovecot IMAP and
# LMTP, PostgreSQL, memcached and nginx, redis-server for the cluster tests (the package scripts start nothing without systemd; the
# tests start their own instances on free loopback ports). For the deployment tests
# (tests/test_deploy.py): systemd-analyze (package systemd: `systemd-analyze verify` checks the
# shipped units offline; no running systemd is needed), logrotate (the shipped rotation config),
# ip (iproute2: loopback in the network namespace where the docs' fixed-port commands run) and
# pipx (docs/deployment.md's pipx install). Installed with apt-get when missing
# and we may (root, Debian/Ubuntu); otherwise says what is missing: those tests then skip, except
# in CI (CI=true), where a missing tool fails them.
set -u
need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -x /usr/sbin/sogod ] || need+=(sogo)
[ -d /usr/lib/GNUstep/SOGo/ActiveSync.SOGo ] || need+=(sogo-activesync)
[ -x /usr/sbin/dovecot ] || need+=(dovecot-imapd)
[ -x /usr/lib/dovecot/lmtp ] || need+=(dovecot-lmtpd)
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql)
[ -x /usr/bin/memcached ] || need+=(memcached)
[ -x /usr/sbin/nginx ] || need+=(nginx)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v logrotate >/dev/null 2>&1 || need+=(logrotate)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v pipx >/dev/null 2>&1 || need+=(pipx)
# the cluster tests (tests/test_cluster_*.py): the shared decision cache and block events on Redis
command -v redis-server >/dev/null 2>&1 || command -v valkey-server >/dev/null 2>&1 || need+=(redis-server)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need[*]} for the tests (apt-get)" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } >/tmp/easgate-apt.log 2>&1; then
        tail -n 20 /tmp/easgate-apt.log >&2
        echo "could not install ${need[*]}; the tests that need them will say so" >&2
    fi
else
    echo "note: ${need[*]} not found; install them (e.g. apt-get install ${need[*]}) to run every test" >&2
fi
exit 0
