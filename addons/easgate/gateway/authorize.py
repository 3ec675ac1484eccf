"""ActiveSync authorization: who is asking, may they, and what the gateway does about it.

On a route with `authorize: activesync`, every request gets exactly one recorded decision before
it may reach the upstream, in `requestheaders` (so a streamed body never goes out first): the
applies-to filter, then the one authorization engine (`authz.engine`: identity -> deny lists ->
operator block -> allow lists -> connector | inventory -> mode, cached per exact (user, DeviceId)
with single flight).

The decision is written to the audit log, put on the flow (comment, mark, metadata) for mitmweb,
and enforced: deny answers with the configured status (default 403) or drops the connection like
NetScaler's responder DROP; an allow is granted to this very request in the gateway's ledger,
which `FinalCheck` requires before anything goes upstream. Any exception while deciding is the
decision `internal error` (deny, audited, counted).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import functools
import hashlib
import json
import logging
import operator
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from mitmproxy import command, ctx, http
from mitmproxy import flow as mflow
from mitmproxy.contrib.wbxml.ASCommandResponse import ASCommandResponse

from ..authz import eas_deny, identity, policyload
from ..authz.cache import DecisionCache, cache_key
from ..authz.commands import CommandRule, CommandRules, device_state
from ..authz.engine import Engine
from ..authz.policy import COMMAND_KEYS, Policy, PolicyError, PolicyStore
from ..authz.principal import Principal
from ..authz.revocations import RevocationFile, RevocationTable, make_record, stamp_after
from ..authz.revocations import append as append_revocation
from ..authz.revocations import lookup as lookup_revocation
from ..core import keys
from ..core.decision import INTERNAL_ERROR, Decision, Source
from ..core.errors import ConfigError
from ..core.net import host_of
from ..core.paths import normalize_path
from . import mitmcompat
from .addon import ContentSwitch
from .audittrail import AuditTrail
from .config import Authorization, GatewayConfig
from .finalcheck import Ledger
from .holds import Held, HeldRequests
from .ratelimits import RateLimits
from .respond import answer, drop
from .shared import Current
from .sharedcache import SharedCache
from .tls import TlsOffload
from .xnc import ChangeFollower, ConnectorClient, ConnectorError, to_decision

logger = logging.getLogger("easgate.authz")

MAX_CHECKED_BODY = 64 * 1024  # an ItemOperations request is a few hundred bytes; larger is refused
RELOAD_INTERVAL_S = 2.0
HOLD_TICK_S = 0.5  # revocations are read and held requests re-checked this often (the 5 s bound)
INTERNAL_LOG_EVERY_S = 10.0
EMPTY_POLICY = Policy()  # no policy file: no lists, block mode (the connector decides)


def wire_method(req: http.Request) -> str:
    """The request method exactly as the client sent it (and as the upstream will read it)."""
    return req.data.method.decode("ascii", "backslashreplace")


def policy_digest(store: PolicyStore | None) -> str:
    """Names the policy version in shared cache entries: nodes agree on it without talking."""
    if store is None:
        return "-"
    try:
        return hashlib.sha256(store.path.read_bytes()).hexdigest()[:16]
    except OSError:
        return f"unreadable-{store.generation}"


class CommandKeyConflict(PolicyError):
    """`commands` or `rate_limits` in both the policy file and the gateway config."""


def command_key_conflict(policy: Policy, auth: Authorization | None) -> CommandKeyConflict | None:
    """The error when the policy file and the gateway config both give `commands` or `rate_limits`:
    two places for one rule set would leave an administrator guessing which one is in force."""
    own = auth.commands if auth else CommandRules()
    for key in COMMAND_KEYS:
        if key in policy.command_keys and (own.rules if key == "commands" else own.rate_limits):
            where = policy.source_path or "the policy file"
            return CommandKeyConflict(
                f"{where}: {key}: also set in the gateway config (authorization.{key}); give it in one place: "
                f"remove authorization.{key} from the gateway config (the policy file's reloads with it and "
                f"easgate replay --policy covers it) or remove {key} from the policy file", file=policy.source_path,
                key=key)
    return None


def effective_command_rules(policy: Policy, auth: Authorization | None) -> CommandRules:
    """The command rules and rate limits in force: each from the policy file when it gives them,
    else from the gateway config."""
    own = auth.commands if auth else CommandRules()
    return CommandRules(policy.command_rules.rules if "commands" in policy.command_keys else own.rules,
                        policy.command_rules.rate_limits if "rate_limits" in policy.command_keys else own.rate_limits)


_IDENT_FIELDS: tuple[str, ...] = identity.Identity.__slots__
_ident_values = operator.attrgetter(*_IDENT_FIELDS)


def identity_dict(ident: identity.Identity) -> dict:
    return dict(zip(_IDENT_FIELDS, _ident_values(ident)))


_clock_text: list = [None, ""]  # (the second, its text): audit lines of one second share it


def now_text() -> str:
    """time.strftime("%Y-%m-%dT%H:%M:%S%z") (local time, as the audit lines have it), made once a second."""
    t = int(time.time())
    if t != _clock_text[0]:
        _clock_text[:] = [t, time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))]
    return _clock_text[1]


def header_text(headers: http.Headers, name: bytes) -> str | None:
    """headers.get(name) for a lower-case `name`, in one pass over the fields without mitmproxy's
    per-field key conversion: the values joined with ", " (decoded utf-8/surrogateescape), or None."""
    values = [v for k, v in headers.fields if k.lower() == name]
    return ", ".join([v.decode("utf-8", "surrogateescape") for v in values]) if values else None


def certified(ident: identity.Identity) -> dict[str, str]:
    """What the callout adds about the certificate and the user's source (XNC ignores extra parameters)."""
    extra = {"userSource": ident.user_source}
    if ident.cert_device_id:
        extra["certDeviceId"] = ident.cert_device_id
    if ident.cert_user:
        extra["certUser"] = ident.cert_user
    return extra


class HeaderIndex:
    """A request's headers by name, indexed in one pass; `get_all` answers as mitmproxy's
    Headers.get_all does (ASCII case-insensitive names, values decoded utf-8/surrogateescape),
    without scanning every field for each name asked."""

    __slots__ = ("_by_name",)

    def __init__(self, headers: http.Headers) -> None:
        by_name: dict[bytes, list[bytes]] = {}
        for k, v in headers.fields:
            by_name.setdefault(k.lower(), []).append(v)
        self._by_name = by_name

    def get_all(self, name: str) -> list[str]:
        values = self._by_name.get(name.encode("utf-8", "surrogateescape").lower(), ())
        return [v.decode("utf-8", "surrogateescape") for v in values]

    def raw(self, name: bytes) -> list[bytes] | tuple[()]:
        """The raw values of a lower-case `name`, as sent."""
        return self._by_name.get(name, ())


#: every header identity.parse_request reads (a parse is reused only when they are all the same)
PARSED_HEADERS = (b"authorization", b"ms-asprotocolversion", b"x-ms-policykey", b"user-agent")


class ActiveSyncGate:
    """Decides on routes that say `authorize: activesync`; nothing else touches those flows after it."""

    def __init__(self, current: Current, tls: TlsOffload, audit: AuditTrail, ledger: Ledger,
                 switch: ContentSwitch) -> None:
        self.current = current  # the config in force: whether and how a route authorizes
        self.tls = tls  # the connection's certificate verdict
        self.audit = audit  # asked before an allow, and given every decision's line
        self.ledger = ledger  # where an allow is granted to this very request, for FinalCheck
        self.switch = switch  # its requests per route, for easgate.status
        self.auth: Authorization | None = None
        self.policy: PolicyStore | None = None
        self.connector: ConnectorClient | None = None
        self.cache: DecisionCache | None = None
        self.principal: Principal | None = None
        self.counters: Counter = Counter()
        # called with (flow, decision, seconds) after every decision: the metrics' latency histogram
        self.observers: list[Callable[[http.HTTPFlow, Decision, float], None]] = []
        self.engine = Engine(self._policy)
        self._reload_task: asyncio.Task | None = None
        self._running = False  # mitmproxy's `running` came: a reload starts what it newly needs
        self._probe_task: asyncio.Task | None = None
        self._workdir: Path | None = None  # SQLite inventories of large policies
        self.holds = HeldRequests()
        self.parsed: dict[str, tuple[tuple, identity.Identity]] = {}  # client id -> its last parse (key, identity)
        self.revocations = RevocationFile(None)
        self.cluster_revocations = RevocationTable()  # what the other nodes revoked (through Redis)
        self._holds_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.limiter = RateLimits(())
        self._internal_logged = float("-inf")
        self._internal_suppressed = 0
        self.shared: SharedCache | None = None  # the Redis tier (docs/scaling.md), if configured
        self.follower: ChangeFollower | None = None  # the connector's change feed, if configured
        self._follow_task: asyncio.Task | None = None
        self._digest = "-"
        self._rules = CommandRules()
        self._rules_of: Policy | None = None  # the policy `_rules` were merged with

    # -- configuration --------------------------------------------------------------------

    def prepare(self, cfg: GatewayConfig) -> Callable[[], None]:
        """Load the policy and the revocations aside (what can fail); the swap builds the rest."""
        auth = cfg.authorization
        policy = None
        if auth and auth.policy:
            try:
                policy = PolicyStore(auth.policy, prepare=functools.partial(self._admit, auth),
                                     retire=policyload.release)
            except CommandKeyConflict as e:
                raise ConfigError(cfg.path, f"authorization.{e.key}", str(e))
            except PolicyError as e:
                raise ConfigError(cfg.path, "authorization.policy", str(e), "fix the policy file")
        revocations = RevocationFile(auth.revocations if auth else None)
        revocations.poll()  # revoked devices stay revoked across restarts
        return functools.partial(self._swap, auth, policy, revocations)

    def apply(self, cfg: GatewayConfig) -> None:
        self.prepare(cfg)()

    def _swap(self, auth, policy: PolicyStore | None, revocations: RevocationFile) -> None:
        if self.connector:
            self.connector.close()
        self.auth, self.policy = auth, policy
        self.connector = ConnectorClient(auth.connector) if auth and auth.connector else None
        self.principal = Principal(auth.identity) if auth else None
        self.cache = DecisionCache(auth.cache.allow_ttl_s, auth.cache.deny_ttl_s, auth.cache.max_entries) if auth else None
        self._digest = policy_digest(policy)
        old, self.shared = self.shared, None
        if old is not None:
            self._spawn(old.close())
        if auth and auth.cache.redis and self.cache is not None:
            # the lock outlives one callout (a dead holder's lock expires, the others then ask)
            lock_ms = 2 * (auth.connector.timeout_ms if auth.connector else 1000) + 1000
            self.shared = SharedCache(auth.cache.redis, self.cache, lock_ms=lock_ms, digest=lambda: self._digest)
            self.shared.on_revoke.append(self.device_revoked)
            self.shared.on_revocation.append(self.cluster_revocation)
            self.shared.known_revocations = self.known_revocations
            if self._running:  # reconfigured while running: the replaced one was listening
                self.shared.start()
        self._stop_following()
        if auth and auth.connector and auth.connector.changes:
            self.follower = ChangeFollower(auth.connector, self.connector_changed, self.connector_reset)
            if self._running:  # reconfigured while running
                self._follow_task = asyncio.get_running_loop().create_task(self.follower.run())
        self.limiter.close()
        # one budget per device for every worker of this machine, or of the cluster with Redis
        self.limiter = RateLimits(auth.commands.rate_limits if auth else (), self.shared)
        self._rules_of = None
        if revocations.path is None and self.revocations.path is None:
            revocations = self.revocations  # this process's own (easgate.revoke without a file) stay in force
        self.revocations = revocations
        if self.shared is None:  # without Redis, nothing but this machine's own revocations
            self.cluster_revocations.clear()
        self.engine = Engine(self._policy, self._connector_lookup if self.connector else None, self.cache,
                             self.shared)
        if self._running:
            self._start_watchers()

    def _stop_following(self) -> None:
        if self._follow_task is not None:
            self._follow_task.cancel()
            self._follow_task = None
        if self.follower is not None:
            self.follower.close()
            self.follower = None

    def connector_changed(self, devices: tuple[str, ...]) -> None:
        """The connector's change feed names devices whose decision may have changed (an operator's
        block, an unblock, a compliance change): their cached decisions go, and their held long
        polls are decided again at once (a callout) and closed on a deny, within a poll of the block."""
        for device_id in devices:
            self.counters["connector_changes"] += 1
            if self.shared is not None:  # every node forgets it; the revocation hook re-decides here
                self._spawn(self.shared.revoke(device_id))
                continue
            d = device_id.strip().lower()
            n = self.cache.forget(lambda k, d=d: isinstance(k, tuple) and str(k[1]).lower() == d) if self.cache else 0
            held = list(self.holds.of_device(device_id))
            if n or held:
                logger.info(f"easgate: the connector says {device_id} changed; {n} cached decisions dropped, "
                            f"{len(held)} held requests decided again")
            for h in held:
                self._spawn(self.reauthorize(h, "connector change"))

    def connector_reset(self, why: str) -> None:
        """Anything may have changed in the connector: forget every decision, decide every held request again."""
        self.counters["connector_resets"] += 1
        n = self.cache.clear() if self.cache else 0
        if self.shared is not None:
            self._spawn(self.shared.clear_all())
        if n or len(self.holds):
            logger.info(f"easgate: {why}; {n} cached decisions dropped, {len(self.holds)} held requests decided again")
        if len(self.holds):
            self._spawn(self.recheck_all("connector change"))

    def device_revoked(self, device_id: str) -> None:
        """A device was revoked cluster-wide (an operator's block seen by a connector,
        easgate.cluster.revoke on any node); its cached decisions here are already gone.

        Its held long polls (Ping, Sync with Wait) in this process are decided again at once
        (the shared and local entries are gone, so the connector is asked) and closed on a deny,
        so a blocked phone does not keep a Ping open for up to an hour.
        """
        self.counters["devices_revoked"] += 1
        for h in list(self.holds.of_device(device_id)):
            self._spawn(self.reauthorize(h, "cluster revocation"))

    def cluster_revocation(self, rec: dict) -> None:
        """A revocation record from Redis (another node's, or this node's own coming back): in force
        here at once if it is newer than what this node knew."""
        r = self.cluster_revocations.apply(rec, newest_wins=True)
        if r is None:
            return
        self.counters["cluster_revocations"] += 1
        logger.info(f"easgate: {'revoked' if r['action'] == 'revoke' else 'restored'} {r['user'] or '*'} on "
                    f"{r['device_id']} (from the cluster): {r['reason']}")
        self.revocation_changed(r)

    def known_revocations(self) -> list[dict]:
        """Every revocation record this node knows: its own (file, command) and the cluster's."""
        return [*self.revocations.table.all(), *self.cluster_revocations.all()]

    def revocation(self, user: str | None, device_id: str | None):
        """The revocation in force for this user and device, whoever made it."""
        return lookup_revocation(user, device_id, self.revocations.table, self.cluster_revocations)

    def revocation_changed(self, r: dict) -> None:
        """A record came into force: a revoke drops the device's cached decisions and closes its held
        requests (those of the users it names) at once; a restore needs nothing (the next request decides)."""
        if r["action"] != "revoke":
            return
        self.counters["revocations"] += 1
        dev = r["device_id"].lower()
        if self.cache is not None:
            self.cache.forget(lambda k: isinstance(k, tuple) and len(k) == 2 and str(k[1]).lower() == dev)
        for h in list(self.holds.of_device(r["device_id"])):
            found = self.revocation(h.ident.user, h.ident.device_id)
            if found is not None:
                self.close_held(h, Decision(False, f"revoked: {found.reason}", Source.REVOKED), "revocation")

    def _spawn(self, coro) -> None:
        try:
            t = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:
            coro.close()
            return
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def load(self, loader) -> None:
        loader.add_option("easgate_policy_poll_ms", int, int(RELOAD_INTERVAL_S * 1000),
                          "Milliseconds between checks of the policy files for a replaced file (tests shorten it).")

    def running(self) -> None:
        self._running = True
        self._start_watchers()
        if self.shared:
            self.shared.start()
        if isinstance(self.connector, ConnectorClient):
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_connector(self.connector))
        if self.follower is not None and self._follow_task is None:
            self._follow_task = asyncio.get_running_loop().create_task(self.follower.run())

    def _start_watchers(self) -> None:
        """The policy watcher and the held-request/revocation-file watcher, once each, as soon as
        there is something to watch (also when a reload is the first config to give it)."""
        loop = asyncio.get_running_loop()
        if self.policy and self._reload_task is None:
            self._reload_task = loop.create_task(self._watch_policy())
        if self.auth and self._holds_task is None:
            self._holds_task = loop.create_task(self._watch_holds())

    async def _probe_connector(self, client: ConnectorClient) -> None:
        """One line at start-up when the connector cannot be reached: until it can, every decision
        it would make goes to on_connector_error, and the operator should know before the phones do."""
        why = await client.probe()
        if why is not None and self.auth is not None:
            logger.warning(f"easgate: the connector {client.cfg.url} is unreachable ({why}); until it answers, "
                           f"its decisions fall to on_connector_error={self.auth.on_connector_error}")

    def done(self) -> None:
        # synchronous: mitmproxy also calls done when a script is unloaded, where no hook may await
        for t in (self._reload_task, self._probe_task, self._holds_task, *self._tasks):
            if t:
                t.cancel()
        self._stop_following()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        if self.shared:
            self._spawn(self.shared.close())

    def _admit(self, auth: Authorization | None, policy: Policy) -> Policy:
        """A loaded policy is refused if it gives command rules the config gives too; else compacted."""
        err = command_key_conflict(policy, auth)
        if err is not None:
            raise err
        return self._compact(policy)

    def _compact(self, policy):
        """A large inventory goes to an SQLite file (built off the loop on reloads: policyload)."""
        if len(policy.inventory) <= policyload.COMPACT_ABOVE:
            return policy
        return policyload.compact(policy, self._scratch())

    def _scratch(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="easgate-policy-"))
            atexit.register(shutil.rmtree, self._workdir, True)  # also after `easgate check`
        return self._workdir

    async def _watch_policy(self) -> None:
        while True:
            await asyncio.sleep(max(ctx.options.easgate_policy_poll_ms, 1) / 1000)
            # Loading a large inventory takes seconds (1,000,000 devices: ~4 s) of Python that
            # holds the GIL, so not a thread: another process, which hands back an SQLite file.
            store = self.policy
            if store is not None:
                result = await store.reload_async(self._load_elsewhere)
                if store is self.policy:
                    self._reloaded(*result)
                logger.debug(f"easgate: policy check {store.checks} done")

    async def _load_elsewhere(self, path: Path):
        policy = await policyload.load_policy_elsewhere(path, self._scratch())
        err = command_key_conflict(policy, self.auth)
        if err is not None:
            policyload.release(policy)
            raise err
        return policy

    def _reload(self, force: bool) -> str:
        if not self.policy:
            return "no policy file configured"
        if isinstance(self.policy.policy.inventory, policyload.SqliteInventory):
            # a large inventory: read it in another process, as the automatic check does
            asyncio.get_running_loop().create_task(self._reload_elsewhere(self.policy))
            return f"reloading {self.policy.path} in the background (large inventory); the result is logged"
        return self._reloaded(*self.policy.reload(force=force))

    async def _reload_elsewhere(self, store) -> None:
        result = await store.reload_async(self._load_elsewhere, force=True)
        if store is self.policy:
            self._reloaded(*result)

    def _reloaded(self, changed: bool, err: str | None) -> str:
        if err:
            self.counters["policy_reload_errors"] += 1
            logger.error(f"easgate: policy reload failed, keeping the last good policy: {err}")
            return f"reload failed, last good policy kept: {err}"
        if changed:
            n = self.cache.clear() if self.cache else 0
            self._digest = policy_digest(self.policy)
            if self.shared:  # every node drops what it holds; the digest keeps old shared entries apart
                self._spawn(self.shared.clear_all())
            self.counters["policy_reloads"] += 1
            if len(self.holds):
                self._spawn(self.recheck_all("policy reload"))
            logger.info(f"easgate: policy reloaded from {self.policy.path}; {n} cached decisions dropped")
            return f"policy reloaded from {self.policy.path}; {n} cached decisions dropped"
        return "policy unchanged"

    # -- the hook -------------------------------------------------------------------------

    # The hooks return what is left to await, or None: a request on a route without authorization
    # needs no task of its own (FastAddonManager.start_hook).

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response or flow.error:
            return None
        name = flow.metadata.get(keys.ROUTE)
        try:
            if not name or self.current.config.route(name).authorize != "activesync":
                return None
        except KeyError:  # routed on a config a reload replaced: FinalCheck denies it, audited
            return None
        return self._authorize(flow)

    async def _authorize(self, flow: http.HTTPFlow) -> None:
        start = time.perf_counter()
        try:
            ident, decision = await self.decide(flow)
        except Exception as e:  # any fault while deciding is a deny, never a pass
            self._internal_error(e)
            ident, decision = None, INTERNAL_ERROR
        if decision.allow and keys.PENDING in flow.metadata:
            decision = self.await_body(flow)
            if decision is None:  # the rest of the decision is made on the body, in `request`
                flow.metadata[keys.PENDING] = (ident, start)
                return
        seconds = time.perf_counter() - start
        await self.enforce(flow, ident, decision, seconds * 1000)
        for observe in self.observers:
            observe(flow, decision, seconds)

    def await_body(self, flow: http.HTTPFlow) -> Decision | None:
        """None if the body will be read whole and decided on; else the deny that it can't be."""
        rule = flow.metadata[keys.PENDING]
        length = flow.request.headers.get("content-length", "")
        if flow.request.stream or not length.isdigit():
            return Decision(False, f"ItemOperations body without Content-Length cannot be checked for "
                                   f"attachments (command rule {rule})", Source.COMMAND)
        if int(length) > MAX_CHECKED_BODY:
            return Decision(False, f"ItemOperations body of {length} bytes is over the {MAX_CHECKED_BODY} bytes "
                                   f"checked for attachments (command rule {rule})", Source.COMMAND)
        return None

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        pending = flow.metadata.get(keys.PENDING)
        if not isinstance(pending, tuple) or flow.response or flow.error:
            return None
        return self._decide_on_body(flow, pending)

    async def _decide_on_body(self, flow: http.HTTPFlow, pending: tuple) -> None:
        del flow.metadata[keys.PENDING]
        ident, start = pending
        try:
            d = self.body_decision(flow)
        except Exception as e:  # noqa: BLE001 - nothing goes on without its decision
            d = Decision(False, f"checking the ItemOperations body failed: {e!r}", Source.INTERNAL)
        seconds = time.perf_counter() - start
        await self.enforce(flow, ident, d, seconds * 1000)
        for observe in self.observers:
            observe(flow, d, seconds)

    def body_decision(self, flow: http.HTTPFlow) -> Decision:
        """ItemOperations under a rule refusing attachments: allow unless it fetches a FileReference."""
        rule = flow.metadata.get(keys.RULE)
        body = flow.request.raw_content or b""
        if len(body) > MAX_CHECKED_BODY:
            return Decision(False, f"ItemOperations body over {MAX_CHECKED_BODY} bytes (command rule {rule})", Source.COMMAND)
        try:
            root = ET.fromstring(ASCommandResponse(body).xmlString)
            if root.tag.rpartition("}")[2] != "ItemOperations":
                raise ValueError(f"the document is {root.tag.rpartition('}')[2]}, not ItemOperations")
        except Exception as e:  # noqa: BLE001 - what cannot be decoded is refused on such routes
            return Decision(False, f"ItemOperations body is not WBXML the gateway can check ({type(e).__name__}); "
                                   f"command rule {rule} refuses attachments", Source.COMMAND)
        for el in root.iter():
            if el.tag.rpartition("}")[2] == "Fetch" and any(c.tag.rpartition("}")[2] == "FileReference"
                                                            for c in el.iter()):
                return Decision(False, f"attachment download (ItemOperations Fetch of a FileReference) not allowed "
                                       f"by command rule {rule}", Source.COMMAND)
        return Decision(True, f"ItemOperations without an attachment fetch (command rule {rule})", Source.COMMAND)

    def enforced(self, flow: http.HTTPFlow) -> bool:
        """False on a route in shadow mode (`enforce: false`): decide and record, never act."""
        name = flow.metadata.get(keys.ROUTE)
        try:
            return not name or self.current.config.route(name).enforce
        except KeyError:  # a reload removed the route while its request was decided: enforce
            return True

    async def decide(self, flow: http.HTTPFlow, count: bool = True) -> tuple[identity.Identity | None, Decision]:
        """The device decision, then (for an allowed device) the command rules and rate limits.
        `count`: the request counts against the rate limits (a held request re-checked does not)."""
        ident, d = await self.decide_device(flow)
        if not d.allow or ident is None or not self.command_rules():
            return ident, d
        return ident, await self.command_decision(flow, ident, d, count)

    def command_rules(self) -> CommandRules:
        """The command rules and rate limits in force (the policy file's, else the config's)."""
        policy = self._policy()
        if policy is not self._rules_of:  # merged once per policy version, not per request
            self._rules, self._rules_of = effective_command_rules(policy, self.auth), policy
            self.limiter.limits = self._rules.rate_limits  # counts of limits kept by name survive a reload
        return self._rules

    async def command_decision(self, flow: http.HTTPFlow, ident: identity.Identity, d: Decision, count: bool) -> Decision:
        rules = self.command_rules()
        rule: CommandRule | None = None
        if rules.rules:
            rule = rules.rule_for(ident.user, ident.device_type, ident.user_agent, self.device_state(ident))
        if rule is not None:
            flow.metadata[keys.RULE] = rule.name
            deny = rules.check(rule, ident.command)
            if deny is not None:
                return deny
            if ident.command == "ItemOperations" and rule.checks_attachments:
                flow.metadata[keys.PENDING] = rule.name
        if count and rules.rate_limits:
            hit = await self.limiter.hit(cache_key(ident.user, ident.device_id), ident.command)
            if hit is not None:
                lim, wait = hit
                flow.metadata[keys.RULE] = lim.name
                flow.metadata[keys.RETRY_AFTER] = wait
                return Decision(False, f"rate limit {lim.name}: over {lim.requests} requests in {lim.per_s:g}s; "
                                       f"retry after {wait}s", Source.RATE_LIMIT)
        return d

    def device_state(self, ident: identity.Identity) -> str:
        policy = self.policy.policy if self.policy else None
        entry = policy.inventory.get((ident.device_id or "").strip().lower()) if policy else None
        return device_state(entry is not None, bool(entry and entry.compliant))

    async def decide_device(self, flow: http.HTTPFlow) -> tuple[identity.Identity | None, Decision]:
        auth = self.auth
        req = flow.request
        at = auth.applies_to
        # Exact, as the upstream will read it: methods are case-sensitive (RFC 9110 9.1), `options`
        # is not OPTIONS (mitmproxy's `Request.method` upper-cases; the wire bytes are in `data`).
        method = wire_method(req)
        if method in at.pass_methods:
            return None, Decision(True, f"{method} passes without a decision (applies_to.pass_methods)", Source.FILTER)
        host_header = req.host_header or ""
        host = host_of(host_header)
        if not normalize_path(req.path).lower().startswith(at.path_prefix.lower()):
            return None, Decision(False, "path not covered by applies_to on an authorized route", Source.FILTER)
        if at.hosts and host not in at.hosts:
            return None, Decision(False, f"host {host} not covered by applies_to", Source.FILTER)
        if method not in at.methods:
            return None, Decision(False, f"method {method} not covered by applies_to", Source.FILTER)
        headers = HeaderIndex(req.headers)  # identity and principal ask for five headers: one pass
        client = flow.client_conn
        path = req.path
        client_ip = client.peername[0] if client.peername else ""
        # parse_request is a function of exactly these: a request that repeats the one before it on
        # its connection (a phone's Ping or Sync loop) reuses that parse (an Identity is frozen)
        key = (method, host_header, path, client_ip, *[headers.raw(n) for n in PARSED_HEADERS])
        last = self.parsed.get(client.id)
        if last is not None and last[0] == key:
            ident = last[1]
        else:
            ident = identity.parse_request(method, "https", host_header, path, headers, client_ip)
            if flow.live and client.timestamp_end is None:  # forgotten in client_disconnected
                self.parsed[client.id] = (key, ident)
        if ident.error:
            return ident, Decision(False, ident.error, Source.IDENTITY)
        if at.commands and ident.command not in at.commands:
            return ident, Decision(False, f"command {ident.command} not covered by applies_to", Source.FILTER)
        # Who is asking, as far as the gateway can verify it (identity.user_from), and whether the
        # DeviceId is the certificate's (device_binding): authz/principal.py, authz/binding.py.
        cert = self.tls.verdict(flow.client_conn)
        ident, why = await self.principal.establish(
            ident, headers.get_all("authorization"),
            base64.b64decode(cert.der_b64) if cert.verified and cert.der_b64 else None, cert.reason,
            self.current.config.route(flow.metadata[keys.ROUTE]).device_binding)
        if why is not None:
            return ident, Decision(False, why, Source.IDENTITY)
        # A revocation beats every list and the cache: it is the operator saying "now".
        if self.shared is not None:
            await self.shared.ready()  # just started: the cluster's revocations first
        r = self.revocation(ident.user, ident.device_id)
        if r is not None:
            return ident, Decision(False, f"revoked: {r.reason}", Source.REVOKED)
        # identity checks, lists, operator block, cache, connector | inventory, mode: authz/engine.py
        return ident, await self.engine.decide(ident)

    def _policy(self) -> Policy:
        return self.policy.policy if self.policy else EMPTY_POLICY

    async def _connector_lookup(self, ident: identity.Identity) -> Decision:
        """The engine's backend when a connector is configured: its answer, or the fail mode."""
        try:
            answer = await self.connector.authorize(ident.user, ident.user_agent, ident.client_ip,
                                                    ident.url, ident.device_id, certified(ident))
        except ConnectorError as e:
            return self._fail_mode(ident, str(e))
        self.counters["connector_answers"] += 1
        return to_decision(answer)

    def _fail_mode(self, ident: identity.Identity, err: str) -> Decision:
        mode = self.auth.on_connector_error
        self.counters["connector_errors"] += 1
        self.counters[f"fail_mode_{mode}"] += 1
        logger.warning(f"easgate: {err}; on_connector_error={mode}")
        if mode == "allow":
            return Decision(True, f"{err}; allowed by on_connector_error=allow", Source.FAIL_MODE)
        if mode == "stale":
            last = self.cache.get_stale(cache_key(ident.user, ident.device_id), self.auth.stale_max_age_s)
            if last is not None:
                return Decision(last.allow, f"{err}; last known decision: {last.reason}", Source.FAIL_MODE)
            return Decision(False, f"{err}; no decision younger than {self.auth.stale_max_age_s:g}s to reuse",
                            Source.FAIL_MODE)
        return Decision(False, f"{err}; denied by on_connector_error=deny", Source.FAIL_MODE)

    def _internal_error(self, e: BaseException) -> None:
        """Count every internal error; log the first of a burst with its traceback, then one line
        per INTERNAL_LOG_EVERY_S saying how many followed (a client that can trigger one must not
        be able to flood the log)."""
        self.counters["internal_errors"] += 1
        now = time.monotonic()
        if now - self._internal_logged < INTERNAL_LOG_EVERY_S:
            self._internal_suppressed += 1
            return
        more = f" ({self._internal_suppressed} more since the last report)" if self._internal_suppressed else ""
        self._internal_logged, self._internal_suppressed = now, 0
        logger.error(f"easgate: internal error while deciding, request denied{more}: {type(e).__name__}: {e}",
                     exc_info=e)

    async def fail_closed(self, flow: http.HTTPFlow, why: str, started: float) -> None:
        """FinalCheck found no allow for this request: deny it as `internal error`, audited."""
        self._internal_error(RuntimeError(why))
        try:
            await self.enforce(flow, None, INTERNAL_ERROR, (time.perf_counter() - started) * 1000)
        except Exception as e:  # e.g. the audit log itself fails: still a deny
            self.counters["audit_errors"] += 1
            logger.error(f"easgate: could not record the internal-error deny: {type(e).__name__}: {e}")
            drop(flow)

    async def enforce(self, flow: http.HTTPFlow, ident: identity.Identity | None, d: Decision, ms: float) -> None:
        d = self.audit.admit(d)  # audit.on_error=deny: an allow whose line cannot be written is a deny
        enforced = self.enforced(flow)
        flow.metadata[keys.DECISION] = {"allow": d.allow, "reason": d.reason, "source": str(d.source),
                                       **({} if enforced else {"enforced": False})}
        if ident is not None:
            flow.metadata[keys.IDENTITY] = identity_dict(ident)
        # the route first, as on flows without a decision ("route mdm"), then the command (a base64
        # query hides it from mitmweb's path column) and, below, the command rule: each flow says all
        flow.comment = (f"{'' if enforced else 'shadow, not enforced: '}{self.route_and_command(flow, ident)}: "
                        f"{d.verdict}: {d.reason} [{d.source}]")
        req = flow.request
        how = None if d.allow else self.deny_answer(ident, d, flow.metadata.get(keys.RETRY_AFTER))
        rule = flow.metadata.get(keys.RULE)
        if rule:
            flow.comment += f" (rule {rule})"
        record = {
            "time": now_text(),
            "client_ip": flow.client_conn.peername[0] if flow.client_conn.peername else None,
            "method": wire_method(req),
            "route": flow.metadata.get(keys.ROUTE),
            "user": ident.user if ident else None,
            "device_id": ident.device_id if ident else None,
            "device_type": ident.device_type if ident else None,
            "command": ident.command if ident else None,
            "agent": header_text(req.headers, b"user-agent"),
            "decision": d.verdict,
            "reason": d.reason,
            "source": str(d.source),
            "latency_ms": round(ms, 3),
            "flow": flow.id,
            **({"rule": rule} if rule else {}),
            **({"answer": "connection dropped" if how is None else how.why} if not d.allow else {}),
            **({} if enforced else {"enforced": False}),
        }
        # The request goes on (upstream, or its deny answer) once its line is written.
        if not await self.audit.record(record) and d.allow and self.audit.log.on_error == "deny":
            # not written in time: the allow becomes a deny; a second line for this flow says so
            d = Decision(False, "audit line not written in time; denied by audit.on_error=deny", "audit")
            self.audit.log.refused()
            flow.metadata[keys.DECISION] = {"allow": False, "reason": d.reason, "source": d.source}
            flow.comment = f"{self.route_and_command(flow, ident)}: {d.verdict}: {d.reason} [{d.source}]"
            self.audit.log.submit(dict(record, decision=d.verdict, reason=d.reason, source=d.source))
            how = self.deny_answer(ident, d)
        self.counters[f"{d.verdict}_{d.source}"] += 1
        if not enforced:  # shadow mode: the would-be deny is on record; the request goes on
            if not d.allow:
                self.counters["shadow_denies"] += 1
                flow.marked = ":eyes:"
            elif ident is not None and flow.live:
                self.holds.add(flow, ident)
            self.ledger.grant(flow)  # report-only: FinalCheck lets it go on whatever the decision
            return
        if d.allow:
            if ident is not None and flow.live:
                self.holds.add(flow, ident)
            # Last, after the audit line: FinalCheck forwards nothing on an authorized route without it.
            self.ledger.grant(flow)
            return
        if d.source not in (Source.CACHE, Source.AUDIT):  # one line per fresh deny (an audit outage is logged once)
            logger.info(f"easgate: deny {ident.user if ident else '-'} {ident.device_id if ident else '-'}: "
                        f"{d.reason} [{d.source}]")
        flow.marked = ":no_entry:"
        if how is None:
            drop(flow)
            return
        flow.metadata[keys.ANSWER] = how.why
        answer(flow, http.Response.make(how.status, how.body, how.headers))

    @staticmethod
    def route_and_command(flow: http.HTTPFlow, ident: identity.Identity | None) -> str:
        """`route activesync: Sync` (the comment's head; no command when none was parsed)."""
        route = f"route {flow.metadata.get(keys.ROUTE) or '-'}"
        return f"{route}: {ident.command}" if ident is not None and ident.command else route

    def deny_answer(self, ident: identity.Identity | None, d: Decision,
                    retry_after: int | None = None) -> eas_deny.DenyAnswer | None:
        """How a deny is answered (deny.mode; a rate limit always with 503); None: drop the connection."""
        deny = self.auth.deny
        if d.source == "rate-limit":
            return eas_deny.throttled(retry_after or 1, "Too many requests from this device; retry later.\n")
        if deny.mode == "drop":
            return None
        if deny.mode == "activesync" and ident is not None:
            status = eas_deny.ACCESS_DENIED_STATUS if d.source == "command" else eas_deny.BLOCKED_STATUS
            return eas_deny.blocked(ident.command, ident.protocol_version, deny.body, status)
        headers = {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"}
        if deny.retry_after_s is not None:
            headers["Retry-After"] = str(deny.retry_after_s)
        return eas_deny.DenyAnswer(deny.status, headers, deny.body.encode(), None, f"HTTP {deny.status}")

    # -- held requests ----------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if mitmcompat.withdraw_held_answer(flow):
            # the upstream answered a request being ended for a deny before its connection closed:
            # that answer does not reach the denied device; the connection is reset instead
            flow.kill()

    def response(self, flow: http.HTTPFlow) -> None:
        self.holds.remove(flow)

    def client_disconnected(self, client) -> None:
        self.parsed.pop(client.id, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self.holds.remove(flow)
        mitmcompat.withdraw_held_answer(flow)

    async def _watch_holds(self) -> None:
        while True:
            await asyncio.sleep(HOLD_TICK_S)
            try:
                await self.check_holds()
            except Exception as e:  # noqa: BLE001 - the watcher must outlive one bad round
                logger.error(f"easgate: checking held requests failed: {e!r}")

    async def check_holds(self) -> None:
        """New revocations close what they name; held requests are re-authorized every allow_ttl_s."""
        for r in self.revocations.poll_records():
            self.revocation_changed(r)
            if self.shared is not None:  # every node: through Redis (kept there if it is down meanwhile)
                self._spawn(self.shared.put_revocation(r))
        every = max(self.auth.cache.allow_ttl_s, HOLD_TICK_S)
        for h in self.holds.due(every):
            self._spawn(self.reauthorize(h, "re-authorization"))

    async def recheck_all(self, trigger: str) -> None:
        await asyncio.gather(*(self.reauthorize(h, trigger) for h in self.holds.all()))

    async def reauthorize(self, h: Held, trigger: str) -> None:
        """Decide again for a request still held; close it if the answer is now deny."""
        h.checking = True
        try:
            _ident, d = await self.decide(h.flow, count=False)
        except Exception as e:  # noqa: BLE001 - any error on the way is a deny
            d = Decision(False, f"re-authorization failed: {e!r}", Source.INTERNAL)
        finally:
            h.checking = False
        if h.flow.id not in self.holds.held:
            return  # answered meanwhile
        if d.allow:
            h.authorized = self.holds.clock()
            self.counters["held_reauthorized"] += 1
        else:
            self.close_held(h, d, trigger)

    def close_held(self, h: Held, d: Decision, trigger: str) -> None:
        """End a held request whose device is now denied: answered with the deny a phone understands
        (deny.mode) while the client has no response bytes yet, else both connections reset."""
        enforced = self.enforced(h.flow)
        flow, ident = h.flow, h.ident
        how = self.deny_answer(ident, d) if enforced else None
        held_s: float | None = None
        if how is not None:
            held_s = self.holds.answer(h, http.Response.make(how.status, how.body, how.headers))
        if held_s is not None:
            answered = how.why if how is not None else ""
            flow.metadata[keys.ANSWER] = answered
        elif enforced:
            held_s = self.holds.close(h)
            answered = "connection reset"
        else:  # shadow mode: record what would have been closed, leave it open
            self.holds.remove(h.flow)
            held_s = self.holds.clock() - h.since
            answered = ""
        self.counters["held_closed" if enforced else "held_shadow_closed"] += 1
        did = "closed" if enforced else "shadow, not enforced: would close"
        flow.comment = (f"{did} {ident.command or 'request'} after {held_s:.1f}s by {trigger}: {d.verdict}: {d.reason} [{d.source}]"
                        + (f"; answered {answered}" if answered else ""))
        flow.marked = ":no_entry:" if enforced else ":eyes:"
        flow.metadata[keys.DECISION] = {"allow": False, "reason": d.reason, "source": d.source, "closed_by": trigger}
        self.audit.log.submit({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "event": "held request closed" if enforced else "held request would be closed",
            "trigger": trigger,
            "route": flow.metadata.get(keys.ROUTE),
            "user": ident.user, "device_id": ident.device_id, "device_type": ident.device_type,
            "command": ident.command,
            "decision": d.verdict, "reason": d.reason, "source": d.source,
            "held_s": round(held_s, 3),
            "flow": flow.id,
            **({"answer": answered} if enforced else {"enforced": False}),
        })
        logger.info(f"easgate: {did} {ident.command} of {ident.user} {ident.device_id} held {held_s:.1f}s "
                    f"({trigger}): {d.reason} [{d.source}]" + (f"; answered {answered}" if answered else ""))

    # -- commands -------------------------------------------------------------------------

    @command.command("easgate.reload")
    def reload(self) -> str:
        """Reload the ActiveSync policy file now; a broken file keeps the last good policy."""
        return self._reload(force=True)

    @command.command("easgate.revoke")
    def revoke(self, user: str, device_id: str) -> str:
        """Deny USER (or * for any user) on DEVICEID from now on and close its held requests on every
        worker (through authorization.revocations; without it, in this process only) and, with a
        shared cache on Redis, on every node."""
        return self._revoke_command(user, device_id, "revoke")

    @command.command("easgate.unrevoke")
    def unrevoke(self, user: str, device_id: str) -> str:
        """Lift a revocation of USER (or *) on DEVICEID, where easgate.revoke put it."""
        return self._revoke_command(user, device_id, "restore")

    def _revoke_command(self, user: str, device_id: str, action: str) -> str:
        user_or_any = None if user in ("", "*") else user
        reason = "easgate.revoke" if action == "revoke" else "easgate.unrevoke"
        done = "revoked" if action == "revoke" else "restored"
        # stamped after every record known for it here, so that it is the one in force
        dev, who = device_id.lower(), (user_or_any or "*").lower()
        now = stamp_after(time.time(), self.revocations.table.of_device(dev).get(who),
                          self.cluster_revocations.of_device(dev).get(who))
        if self.revocations.path is not None:
            # the file's followers (every worker here) apply it and pass it on to Redis
            append_revocation(self.revocations.path, user_or_any, device_id, reason, action, now)
            where = f"every worker following {self.revocations.path}"
        else:
            r = self.revocations.table.apply(make_record(user_or_any, device_id, reason, action, now),
                                             newest_wins=False)
            if r is not None:
                self.revocation_changed(r)
                if self.shared is not None:
                    self._spawn(self.shared.put_revocation(r))
            where = "this process only (no authorization.revocations file configured)"
        if self.shared is not None:
            where += f", and every node through Redis {self.shared.shown}"
        return f"{done} {user} on {device_id}: {where}"

    @command.command("easgate.cache.clear")
    def cache_clear(self) -> str:
        """Forget every cached decision (on every node, with a shared cache)."""
        n = self.cache.clear() if self.cache else 0
        if self.shared:
            self._spawn(self.shared.clear_all())
            return f"{n} cached decisions dropped here; every node told"
        return f"{n} cached decisions dropped"

    @command.command("easgate.cluster.revoke")
    def cluster_revoke(self, device_id: str) -> str:
        """Forget a device's decisions on every node at once: its next request (and its held ones)
        asks the connector again. Not a deny of its own: that is easgate.revoke."""
        if not self.shared:
            n = self.cache.forget(lambda k: k[1].lower() == device_id.strip().lower()) if self.cache else 0
            return f"{n} cached decisions of {device_id} dropped (no shared cache configured)"
        self._spawn(self.shared.revoke(device_id))
        return f"cached decisions of {device_id} dropped on every node; its next request asks the connector"

    @command.command("easgate.explain")
    def explain(self, flows: Sequence[mflow.Flow]) -> str:
        """Why each flow was allowed or denied (route, identity, decision, source)."""
        out = []
        for f in flows:
            m = f.metadata
            d = m.get(keys.DECISION)
            ident = m.get(keys.IDENTITY) or {}
            route = m.get(keys.ROUTE)
            if d is None:
                why = "no authorization decision (route does not authorize)" if route else "no route"
                if m.get(keys.REFUSED):
                    why = f"connection refused: {m['easgate.refused']}"
                out.append(f"{f.id[:8]} route={route}: {why}")
            else:
                verdict = "allow" if d["allow"] else "deny"
                out.append(f"{f.id[:8]} route={route} user={ident.get('user')} device={ident.get('device_id')} "
                           f"cmd={ident.get('command')}: {verdict} ({d['source']}): {d['reason']}")
        return "\n".join(out)

    @command.command("easgate.status")
    def status(self) -> str:
        """Counters: requests per route, decisions by source, cache hit rate, connector errors, audit log."""
        cs = self.cache.stats if self.cache else {}
        lookups = cs.get("hits", 0) + cs.get("misses", 0)
        return json.dumps({
            "routes": dict(self.switch.counts),
            "decisions": {k: v for k, v in self.counters.items() if k.startswith(("allow_", "deny_"))},
            "cache": {**cs, "hit_rate": round(cs.get("hits", 0) / lookups, 4) if lookups else None},
            "connector": {"calls": self.connector.calls if self.connector else 0,
                          "errors": self.counters.get("connector_errors", 0),
                          "connections_opened": self.connector.connections_opened if self.connector else 0},
            "audit": self.audit.log.state,
            # errors while deciding (each one a deny, `internal error`) and audit lines that could not be written
            "internal_errors": self.counters.get("internal_errors", 0),
            "audit_errors": self.counters.get("audit_errors", 0),
            "shared": self.shared.stats if self.shared else None,
            "rate_limits": self.limiter.stats if self.limiter.limits else None,
            "connector_changes": self.follower.stats if self.follower else None,
            "policy": {"reloads": self.counters.get("policy_reloads", 0),
                       "reload_errors": self.counters.get("policy_reload_errors", 0),
                       "last_error": self.policy.last_error if self.policy else None},
        }, sort_keys=True)
