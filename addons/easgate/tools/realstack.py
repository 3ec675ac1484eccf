"""A real ActiveSync server on loopback: SOGo's EAS module, Dovecot, PostgreSQL, memcached, nginx.

Everything easgate ever saw used to be made by its own code. This stack lets the tests and
`easgate demo --real` put software nobody here wrote behind the gateway: Debian's `sogo` +
`sogo-activesync` (the ActiveSync server), Dovecot (IMAP for the mailboxes, LMTP for delivery),
PostgreSQL (SOGo's users and state), memcached (SOGo needs it) and nginx (TLS in front of sogod,
which only speaks plain HTTP, and the `/Microsoft-Server-ActiveSync` path that Exchange has).
Mail that SOGo sends goes to a small SMTP->LMTP relay (aiosmtpd) that hands it to Dovecot, so a
SendMail ends in the recipient's IMAP mailbox for real, before SOGo's SMTP transaction is answered.

Needs root (the daemons run as the `sogo`, `postgres` and `memcache` users, like the packages set
up) and the Debian packages (`scripts/ensure_test_tools.sh` installs them). Nothing system-wide is
touched: every file lives in one throw-away directory, every port is a free loopback port chosen at
start, and every process is a child of the caller that `stop()` ends by its PID.

Gotchas this encodes (observed with SOGo 5.8 / Dovecot 2.3 / gnustep-base 1.28 on Debian 12):
* GNUstep ignores $HOME and reads user defaults from `<GNUSTEP_USER_DEFAULTS_DIR>/sogod.plist`,
  so sogod gets its own GNUstep.conf pointing there; `WOPidFile` must be set or sogod exits.
* SOGo's mail Sync sees nothing unless Dovecot reports HIGHESTMODSEQ on a plain SELECT, which it
  does only after a CONDSTORE client selected that mailbox once: `_prime_mailboxes` does that.
* sogod's workers call setsid(), so they are not in the watchdog's process group: `_stop_sogod`
  collects them by parent PID and ends them by PID.
"""

from __future__ import annotations

import contextlib
import email.message
import imaplib
import importlib.util
import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .ports import free_ports

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SOGOD = Path("/usr/sbin/sogod")
DOVECOT = Path("/usr/sbin/dovecot")
NGINX = Path("/usr/sbin/nginx")
MEMCACHED = Path("/usr/bin/memcached")
SETPRIV = Path("/usr/bin/setpriv")
GNUSTEP_CONF = Path("/etc/GNUstep/GNUstep.conf")

#: Debian packages that provide the stack (what scripts/ensure_test_tools.sh installs).
PACKAGES = ("sogo", "sogo-activesync", "dovecot-imapd", "dovecot-lmtpd", "postgresql", "memcached", "nginx")
MAIL_DOMAIN = "example.test"
EAS_PATH = "/Microsoft-Server-ActiveSync"
#: SOGo answers a Ping whose HeartbeatInterval is above this with Status 5: clients must stay at or below it.
MAX_PING_S = 10


@dataclass(frozen=True)
class User:
    login: str
    password: str
    name: str

    @property
    def address(self) -> str:
        return f"{self.login}@{MAIL_DOMAIN}"


USERS = (User("alice", "alice-pw", "Alice Example"), User("bob", "bob-pw", "Bob Example"),
         User("carol", "carol-pw", "Carol Example"))

#: The attachment of the message seeded into alice's inbox (the tests fetch it through the gateway).
ATTACHMENT_NAME = "quarterly-report.txt"
ATTACHMENT = b"Q3 figures: 42 devices synced, 0 unmanaged devices let through.\n"
SEED_SUBJECT = "Welcome to the real ActiveSync stack"


class StackError(RuntimeError):
    """The real server stack cannot run here (missing package, not root) or did not come up."""


def missing() -> list[str]:
    """What keeps the stack from running on this machine (empty when it can run)."""
    out = []
    if os.geteuid() != 0:
        out.append("root (the daemons switch to the sogo/postgres/memcache users)")
    for p, pkg in ((SOGOD, "sogo"), (Path("/usr/lib/GNUstep/SOGo/ActiveSync.SOGo"), "sogo-activesync"),
                   (DOVECOT, "dovecot-imapd"), (Path("/usr/lib/dovecot/lmtp"), "dovecot-lmtpd"),
                   (PG_BIN / "postgres", "postgresql-15"), (MEMCACHED, "memcached"), (NGINX, "nginx"),
                   (SETPRIV, "util-linux")):
        if not p.exists():
            out.append(pkg)
    if importlib.util.find_spec("aiosmtpd") is None:  # the relay runs in its own process
        out.append("python package aiosmtpd (pip install -e '.[test]')")
    return out


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `check()` until it returns something truthy; StackError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        with contextlib.suppress(Exception):
            if r := check():
                return r
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what}: exited with {proc.returncode}" + _tail(log))
        if time.monotonic() > deadline:
            raise StackError(f"{what}: not ready after {timeout:.0f}s" + _tail(log))
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])


def _port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


@dataclass
class RealStack:
    """The running stack. `start()` it (or use it as a context manager), `stop()` it."""

    tls_cert: Path  # nginx's server certificate (the gateway's Exchange pool must trust its CA)
    tls_key: Path
    base: Path | None = None  # throw-away directory; made with mkdtemp when None, removed on stop
    workers: int = 3  # sogod workers; each held Ping occupies one
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _own_base: bool = False
    _seen: set[int] = field(default_factory=set)  # every PID the stack ran, for leftovers()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def eas_url(self) -> str:
        """HTTPS origin of the TLS front (what the gateway's Exchange pool points at)."""
        return f"https://127.0.0.1:{self.ports['https']}"

    @property
    def sogo_eas_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['sogo']}/SOGo{EAS_PATH}"

    def imap(self, user: User) -> imaplib.IMAP4:
        m = imaplib.IMAP4("127.0.0.1", self.ports["imap"], timeout=10)
        m.login(user.login, user.password)
        return m

    def deliver(self, msg: email.message.EmailMessage) -> None:
        """Deliver a message the way mail from outside arrives: SMTP to the relay, LMTP to Dovecot."""
        with smtplib.SMTP("127.0.0.1", self.ports["smtp"], timeout=10) as s:
            s.send_message(msg)

    def subjects(self, user: User, mailbox: str = "INBOX") -> list[str]:
        """Subjects in a mailbox, read over IMAP (what the user's mail client would see)."""
        m = self.imap(user)
        try:
            m.select(mailbox, readonly=True)
            _, data = m.search(None, "ALL")
            out = []
            for num in data[0].split():
                _, parts = m.fetch(num, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                raw = parts[0][1].decode(errors="replace").strip()
                out.append(raw.split(":", 1)[1].strip() if ":" in raw else "")
            return out
        finally:
            m.logout()

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> "RealStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> "RealStack":
        if gaps := missing():
            raise StackError("the real ActiveSync stack needs: " + ", ".join(gaps) +
                             " (scripts/ensure_test_tools.sh installs the packages as root)")
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="easgate-realstack-"))
            self._own_base = True
        self.base.chmod(0o755)  # the daemons' users must reach their subdirectories
        names = ("pg", "imap", "memcached", "smtp", "sogo", "https")
        self.ports = dict(zip(names, free_ports(len(names))))
        try:
            initdb = self._initdb()  # the slowest step (seconds on a busy machine): the rest starts meanwhile
            self._start_dovecot()
            self._start_memcached()
            self._start_relay()
            self._start_nginx()
            self._start_postgres(initdb)
            self._setup_database(timeout)
            wait_for("dovecot", lambda: _port_open(self.ports["imap"]) and (self.base / "dovecot/run/lmtp").exists(),
                     timeout, self.procs["dovecot"], self.base / "logs/dovecot.log")
            wait_for("memcached", lambda: _port_open(self.ports["memcached"]), timeout, self.procs["memcached"])
            # SOGo's workers each create its tables on a fresh database and race (duplicate key errors);
            # a worker that lost the race answered FolderSync partly and Sync with Status 13. So one
            # worker creates them first, then the real number of workers starts.
            self._start_sogod(workers=1)
            wait_for("sogod", self._sogo_answers, timeout, self.procs["sogod"], self.base / "sogo/sogo.log")
            self._stop_sogod()
            self._start_sogod(workers=self.workers)
            wait_for("SMTP relay", lambda: _port_open(self.ports["smtp"]), timeout, self.procs["relay"],
                     self.base / "logs/relay.out")
            self._prime_mailboxes()
            wait_for("sogod", self._sogo_answers, timeout, self.procs["sogod"], self.base / "sogo/sogo.log")
            wait_for("nginx", lambda: _port_open(self.ports["https"]), timeout, self.procs["nginx"],
                     self.base / "logs/nginx-error.log")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """End every process by PID (sogod's setsid workers included) and remove the directory."""
        self._seen.update(_descendants([p.pid for p in self.procs.values()]))
        self._stop_sogod()
        ending = {"nginx": signal.SIGTERM, "relay": signal.SIGTERM, "memcached": signal.SIGKILL,
                  "dovecot": signal.SIGTERM, "postgres": signal.SIGINT}  # SIGINT: postgres' fast shutdown
        for name, sig in ending.items():  # all at once: together they take as long as the slowest
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)
        for name in ending:
            self._end(name, signal.SIGKILL)
        try:
            for pid in self._alive():  # dovecot's log and anvil outlive its master by seconds, deaf to SIGTERM
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_for("the stack's processes to end", lambda: not self.leftovers(), 10)
        finally:
            self.procs.clear()
            if self._own_base and self.base is not None:
                shutil.rmtree(self.base, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """Processes of the stack still running after stop(), as 'pid name'. A dead process that
        init has not reaped yet (dovecot's log process, orphaned when its master exits) is not one."""
        out = []
        for pid in sorted(self._alive()):
            with contextlib.suppress(OSError):
                out.append(f"{pid} {Path(f'/proc/{pid}/comm').read_text().strip()}")
        return out

    def _alive(self) -> list[int]:
        """PIDs the stack ran, plus any process working in its directory (every daemon starts there,
        so a sogod worker the watchdog forked after we looked is found too), that are not dead."""
        if self.base is not None:
            self._seen.update(_working_in(self.base))
        out = []
        for pid in self._seen:
            with contextlib.suppress(OSError, IndexError):
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    out.append(pid)
        return out

    # -- the pieces ------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], *, user: str | None = None, env: dict | None = None,
               cwd: Path | None = None) -> subprocess.Popen:
        """Start a daemon as our child; setpriv drops to `user` and asks the kernel to SIGTERM it if
        we die first (pdeathsig is set after the uid change, so it survives it)."""
        wrap = [str(SETPRIV), "--pdeathsig", "TERM"]
        if user:
            wrap += [f"--reuid={user}", f"--regid={user}", "--init-groups"]
        log = open(self.base / "logs" / f"{name}.out", "wb")
        with log:
            p = subprocess.Popen(wrap + argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 env=env, cwd=cwd or self.base)
        self.procs[name] = p
        return p

    def _dir(self, rel: str, owner: str | None = None, mode: int = 0o755) -> Path:
        d = self.base / rel
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(mode)
        if owner:
            pw = pwd.getpwnam(owner)
            os.chown(d, pw.pw_uid, pw.pw_gid)
        return d

    def _initdb(self) -> subprocess.Popen:
        self._dir("logs", mode=0o777)
        data = self._dir("pg", "postgres", 0o700)
        return subprocess.Popen([str(SETPRIV), "--reuid=postgres", "--regid=postgres", "--init-groups",
                                 str(PG_BIN / "initdb"), "-D", str(data / "data"), "-A", "trust", "-U", "postgres",
                                 "--no-sync", "-E", "UTF8", "--locale=C"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=data)

    def _start_postgres(self, initdb: subprocess.Popen) -> None:
        out, _ = initdb.communicate()
        if initdb.returncode:
            raise StackError("initdb failed: " + out[-800:])
        data = self.base / "pg"
        sock = self._dir("run", "postgres", 0o755)
        self._spawn("postgres", [str(PG_BIN / "postgres"), "-D", str(data / "data"),
                                 "-c", "listen_addresses=127.0.0.1", "-c", f"port={self.ports['pg']}",
                                 "-c", f"unix_socket_directories={sock}", "-c", "fsync=off",
                                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                    user="postgres", cwd=data)

    def _setup_database(self, timeout: float) -> None:
        def psql(db: str, sql: str) -> subprocess.CompletedProcess:
            return subprocess.run([str(PG_BIN / "psql"), "-q", "-X", "-h", "127.0.0.1", "-p", str(self.ports["pg"]),
                                   "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1"], input=sql,
                                  capture_output=True, text=True)

        wait_for("postgres", lambda: psql("postgres", "SELECT 1").returncode == 0, timeout,
                 self.procs["postgres"], self.base / "logs/postgres.out")
        rows = ",".join(f"('{u.login}','{u.login}','{u.password}','{u.name}','{u.address}')" for u in USERS)
        for db, sql in (("postgres", "CREATE USER sogo WITH PASSWORD 'sogo-pw'; CREATE DATABASE sogo OWNER sogo;"),
                        ("sogo", "SET ROLE sogo; CREATE TABLE sogo_users (c_uid varchar(128) PRIMARY KEY, "
                                 "c_name varchar(128) NOT NULL, c_password varchar(256) NOT NULL, "
                                 f"c_cn varchar(256), mail varchar(256)); INSERT INTO sogo_users VALUES {rows};")):
            r = psql(db, sql)
            if r.returncode:
                raise StackError(f"setting up SOGo's database failed: {r.stderr.strip()}")

    def _start_dovecot(self) -> None:
        d = self._dir("dovecot")
        self._dir("dovecot/run")
        self._dir("dovecot/state")
        mail = self._dir("mail", "sogo")
        pw = pwd.getpwnam("sogo")
        (d / "users").write_text("".join(
            f"{u.login}:{{PLAIN}}{u.password}:{pw.pw_uid}:{pw.pw_gid}::{mail}/{u.login}::\n" for u in USERS))
        (d / "dovecot.conf").write_text(f"""\
base_dir = {d}/run
state_dir = {d}/state
instance_name = easgate-{self.base.name}
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
log_path = {self.base}/logs/dovecot.log
mail_location = maildir:~/Maildir
first_valid_uid = 100
mail_uid = sogo
mail_gid = sogo
default_internal_user = dovecot
default_login_user = dovenull
lmtp_save_to_detail_mailbox = no
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {d}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {d}/users
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.ports['imap']}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0600
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Drafts {{
    special_use = \\Drafts
    auto = create
  }}
  mailbox Sent {{
    special_use = \\Sent
    auto = create
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = create
  }}
}}
""")
        self._spawn("dovecot", [str(DOVECOT), "-F", "-c", str(d / "dovecot.conf")])

    def _prime_mailboxes(self) -> None:
        """Switch on modseq tracking (see the module docstring) and seed alice's inbox."""
        for u in USERS:
            m = self.imap(u)
            try:
                m._simple_command("ENABLE", "CONDSTORE")  # imaplib has no enable() for CONDSTORE
                for box in ("INBOX", "Drafts", "Sent", "Trash"):
                    m.select(box)
            finally:
                m.logout()
        self.deliver(seed_message())

    def _start_memcached(self) -> None:
        self._spawn("memcached", [str(MEMCACHED), "-l", "127.0.0.1", "-p", str(self.ports["memcached"]), "-U", "0",
                                  "-m", "32"], user="memcache")

    def _start_relay(self) -> None:
        self._spawn("relay", [sys.executable, "-m", "easgate.tools.smtprelay", "127.0.0.1", str(self.ports["smtp"]),
                              str(self.base / "dovecot/run/lmtp")],
                    env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))

    def _start_sogod(self, workers: int) -> None:
        home = self._dir("sogo", "sogo", 0o700)
        defaults = self._dir("sogo/GNUstep/Defaults", "sogo", 0o700)
        conf = home / "GNUstep.conf"
        lines = []
        for line in GNUSTEP_CONF.read_text().splitlines():
            if line.startswith("GNUSTEP_USER_DEFAULTS_DIR="):
                line = f"GNUSTEP_USER_DEFAULTS_DIR={defaults}"
            elif line.startswith("GNUSTEP_USER_CONFIG_FILE="):
                line = "GNUSTEP_USER_CONFIG_FILE=/dev/null"
            lines.append(line)
        conf.write_text("\n".join(lines) + "\n")
        db = f"postgresql://sogo:sogo-pw@127.0.0.1:{self.ports['pg']}/sogo"
        (defaults / "sogod.plist").write_text(f"""{{
  WOPort = "127.0.0.1:{self.ports['sogo']}";
  WOWorkersCount = {workers};
  WOLogFile = "{home}/sogo.log";
  WOPidFile = "{home}/sogo.pid";
  SOGoProfileURL = "{db}/sogo_user_profile";
  OCSFolderInfoURL = "{db}/sogo_folder_info";
  OCSSessionsFolderURL = "{db}/sogo_sessions_folder";
  OCSEMailAlarmsFolderURL = "{db}/sogo_alarms_folder";
  OCSStoreURL = "{db}/sogo_store";
  OCSAclURL = "{db}/sogo_acl";
  OCSCacheFolderURL = "{db}/sogo_cache_folder";
  OCSAdminURL = "{db}/sogo_admin";
  SOGoUserSources = ({{ type = sql; id = users; viewURL = "{db}/sogo_users"; canAuthenticate = YES;
                        isAddressBook = YES; userPasswordAlgorithm = plain; displayName = "Users"; }});
  SOGoMailDomain = "{MAIL_DOMAIN}";
  SOGoIMAPServer = "imap://127.0.0.1:{self.ports['imap']}";
  SOGoSieveServer = "";
  SOGoSieveScriptsEnabled = NO;
  SOGoMailingMechanism = smtp;
  SOGoSMTPServer = "smtp://127.0.0.1:{self.ports['smtp']}";
  SOGoMemcachedHost = "127.0.0.1:{self.ports['memcached']}";
  SOGoTimeZone = UTC;
  SOGoLanguage = English;
  SOGoSentFolderName = Sent;
  SOGoTrashFolderName = Trash;
  SOGoDraftsFolderName = Drafts;
  SOGoMaximumPingInterval = {MAX_PING_S};
  SOGoMaximumSyncInterval = {MAX_PING_S};
  SOGoInternalSyncInterval = 1;
  SOGoAppointmentSendEMailNotifications = NO;
}}
""")
        for p in (conf, defaults / "sogod.plist"):
            pw = pwd.getpwnam("sogo")
            os.chown(p, pw.pw_uid, pw.pw_gid)
        env = {"GNUSTEP_CONFIG_FILE": str(conf), "HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        self._spawn("sogod", [str(SOGOD), "-WONoDetach", "YES"], user="sogo", env=env, cwd=home)

    def _sogo_answers(self) -> bool:
        u = USERS[0]
        req = urllib.request.Request(self.sogo_eas_url, method="OPTIONS")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPBasicAuthHandler(_pwmgr(self.sogo_eas_url, u)))
        with opener.open(req, timeout=5) as r:
            return r.status == 200

    def _start_nginx(self) -> None:
        d = self._dir("nginx")
        self._dir("nginx/tmp", mode=0o777)
        (d / "nginx.conf").write_text(f"""\
daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {self.base}/logs/nginx-error.log;
events {{ worker_connections 256; }}
http {{
  access_log {self.base}/logs/nginx-access.log;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  server {{
    listen 127.0.0.1:{self.ports['https']} ssl;
    ssl_certificate {self.tls_cert};
    ssl_certificate_key {self.tls_key};
    client_max_body_size 50m;
    location {EAS_PATH} {{
      proxy_pass http://127.0.0.1:{self.ports['sogo']}/SOGo{EAS_PATH};
      proxy_set_header Host $host;
      proxy_set_header x-webobjects-server-protocol HTTP/1.0;
      proxy_set_header x-webobjects-remote-host $remote_addr;
      proxy_set_header x-webobjects-server-port {self.ports['https']};
      proxy_set_header x-webobjects-server-name $host;
      proxy_set_header x-webobjects-server-url https://$host;
      proxy_connect_timeout 5;
      proxy_read_timeout 3600;
      proxy_buffering off;
    }}
    location / {{ return 404; }}
  }}
}}
""")
        self._spawn("nginx", [str(NGINX), "-c", str(d / "nginx.conf"), "-p", str(d), "-e",
                              str(self.base / "logs/nginx-error.log")])

    # -- stopping --------------------------------------------------------------------------

    def _end(self, name: str, sig: int, grace: float = 10) -> None:
        """Wait for a process we signalled; send `sig` when it does not end within `grace`."""
        p = self.procs.get(name)
        if p is None:
            return
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            p.wait()

    def _stop_sogod(self) -> None:
        """The watchdog restarts dead workers and waits for busy ones (a held Ping) on SIGTERM, so:
        note its workers, SIGTERM it, SIGKILL the workers at once (it reaps them), reap it."""
        p = self.procs.get("sogod")
        if p is None or p.poll() is not None:
            return
        self._seen.update(_descendants([p.pid]))
        watchdog = p.pid  # setpriv execs sogod: our child is the watchdog itself
        workers = _children(watchdog)
        with contextlib.suppress(ProcessLookupError):
            os.kill(watchdog, signal.SIGTERM)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            for pid in [*_children(watchdog), watchdog]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            p.wait()


def _pwmgr(url: str, u: User) -> urllib.request.HTTPPasswordMgrWithDefaultRealm:
    m = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    m.add_password(None, url, u.login, u.password)
    return m


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (one pass over /proc)."""
    out = {}
    for st in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            out[int(st.parent.name)] = int(st.read_text().rsplit(")", 1)[1].split()[1])
    return out


def _working_in(base: Path) -> set[int]:
    """PIDs whose current directory is `base` or below it (root reads every /proc/PID/cwd)."""
    out = set()
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        with contextlib.suppress(OSError, ValueError):
            if Path(os.readlink(cwd)).is_relative_to(base):
                out.add(int(cwd.parent.name))
    return out


def _children(pid: int) -> list[int]:
    return [k for k, parent in _parents().items() if parent == pid]


def _descendants(pids: list[int]) -> set[int]:
    parents = _parents()
    out, todo = set(pids), list(pids)
    while todo:
        p = todo.pop()
        for kid, parent in parents.items():
            if parent == p and kid not in out:
                out.add(kid)
                todo.append(kid)
    return out


def seed_message() -> email.message.EmailMessage:
    """The message in alice's inbox at start: from bob, with a text attachment."""
    alice, bob = USERS[0], USERS[1]
    m = email.message.EmailMessage()
    m["From"] = f"{bob.name} <{bob.address}>"
    m["To"] = f"{alice.name} <{alice.address}>"
    m["Subject"] = SEED_SUBJECT
    m["Message-ID"] = "<seed-1@example.test>"
    m.set_content("Hello Alice,\n\nthe report is attached.\n")
    m.add_attachment(ATTACHMENT, maintype="text", subtype="plain", filename=ATTACHMENT_NAME)
    return m
