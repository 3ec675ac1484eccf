"""A lean mitmproxy master for the gateway, and the runner both `easgate run` masters share.

Stock `mitmdump` dispatches every event (a dozen per request) to ~36 addons; most of them have
nothing to do in a reverse-proxy gateway. `LeanMaster` loads only what the gateway needs:

    Core, DisableH2C, Proxyserver, ScriptLoader, NextLayer, ErrorCheck, the termlog, the gateway

Every other mitmdump addon is *dormant*: its options are declared (so every mitmdump flag and
`--set` works, `--options` lists them, ~/.mitmproxy/config.yaml still loads) and the addon is loaded
on demand when one of its options is set: `-w flows` loads Save, `--flow-detail 2` (or `-v`) the
dumper, `--set modify_headers=...` ModifyHeaders, and so on, in mitmdump's order, before the
gateway's addons. The TLS options of mitmproxy's TlsConfig are the exception: the gateway does TLS
on both sides itself, so they are reported as ignored (as they are under the full master too).

Deliberately left out (see docs/scaling.md): TlsConfig (its per-handshake certificate work is
thrown away by the gateway's TlsOffload), UpdateAltSvc, and the per-flow dump by default.
`easgate run --full` runs mitmproxy's DumpMaster with the same gateway.

`run_master()` is main.run() with what a long-running gateway needs on top: the worker's log
prefix, the listener options (SO_REUSEPORT, backlog), a readiness signal for the supervisor, and a
graceful stop (stop accepting, let requests in flight finish within a grace period, then exit).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

from mitmproxy import addonmanager, exceptions, flow, hooks, master, options, optmanager
from mitmproxy import addons as maddons
from mitmproxy.addons import (
    core,
    disable_h2c,
    dumper,
    errorcheck,
    keepserving,
    next_layer,
    proxyserver,
    readfile,
    script,
    tlsconfig,
)
from mitmproxy.tools import cmdline

from ..core.errors import ConfigError
from ..gateway import mitmcompat
from ..gateway.addon import Gateway, forced_options, unknown_options
from ..gateway.chain import validate_config
from . import workers

logger = logging.getLogger("easgate")

# default addons the lean master loads itself (by class)
LEAN = (core.Core, disable_h2c.DisableH2C, proxyserver.Proxyserver, script.ScriptLoader, next_layer.NextLayer)
# options of these are accepted and ignored: the gateway builds client and upstream TLS itself
IGNORED = (tlsconfig.TlsConfig,)
# options that also wake KeepServing (mitmdump exits after reading/replaying unless keepserving)
KEEPSERVING_TRIGGERS = {"rfile", "client_replay", "server_replay", "keepserving"}


def _dormant_candidates() -> list:
    """mitmdump's addons, in mitmdump's order, minus the ones the lean master always has."""
    out = [a for a in maddons.default_addons() if not isinstance(a, LEAN)]
    out += [dumper.Dumper(), keepserving.KeepServing(), readfile.ReadFileStdin()]
    return out


class _OptionRecorder:
    """A Loader stand-in that declares options for the real loader and remembers their names."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.names: list[str] = []

    def add_option(self, name, typespec, default, help, choices=None) -> None:
        self.names.append(name)
        self.loader.add_option(name, typespec, default, help, choices)

    def add_command(self, path, func) -> None:
        pass


class Dormant:
    """Declares the options of mitmdump addons the lean master has not loaded; loads them on demand."""

    name = "easgate-dormant"

    def __init__(self) -> None:
        self.addons = []  # mitmproxy traverses .addons: keep the dormant ones out of it
        self._dormant = _dormant_candidates()
        self.owner: dict[str, object] = {}

    def load(self, loader) -> None:
        for a in self._dormant:
            if hasattr(a, "load"):
                rec = _OptionRecorder(loader)
                a.load(rec)
                for n in rec.names:
                    self.owner.setdefault(n, a)

    def wanted(self, opts: options.Options, forced: set[str]) -> tuple[list, list[str]]:
        """(addons to load, ignored option names) for the options that were set explicitly."""
        explicit = {n for n in self.owner
                    if n not in forced and opts._options[n].value is not optmanager.unset}
        want, ignored = [], []
        for n in sorted(explicit):
            a = self.owner[n]
            if isinstance(a, IGNORED):
                ignored.append(n)
            elif a not in want:
                want.append(a)
        if explicit & KEEPSERVING_TRIGGERS:
            want += [a for a in self._dormant if isinstance(a, keepserving.KeepServing) and a not in want]
        order = {id(a): i for i, a in enumerate(self._dormant)}
        return sorted(want, key=lambda a: order[id(a)]), ignored


class FastAddonManager(addonmanager.AddonManager):
    """AddonManager with the same semantics and a precomputed dispatch plan per event name.

    The stock manager walks every addon tree and looks every hook up by name for every event (about
    a dozen per request): 15% of a lean gateway's CPU. Here the plan (per top-level addon, the hook
    functions of its tree, in order) is computed on first use and dropped whenever addons are
    registered, added or removed, or options change (scripts load and reorder on configure). An
    addon that edits its own `.addons` list at runtime without telling the manager is not seen:
    none of the gateway's or mitmproxy's do outside of those paths.
    """

    def __init__(self, master) -> None:
        super().__init__(master)
        self._plans: dict[str, list[list[Callable]]] = {}

    def register(self, addon):
        self._plans = {}
        try:
            return super().register(addon)
        finally:
            self._plans = {}

    def add(self, *addons) -> None:
        super().add(*addons)
        self._plans = {}

    def remove(self, addon) -> None:
        self._plans = {}
        try:
            super().remove(addon)
        finally:
            self._plans = {}

    def clear(self) -> None:
        super().clear()
        self._plans = {}

    def trigger(self, event: hooks.Hook) -> None:
        configure = isinstance(event, hooks.ConfigureHook)
        if configure:
            self._plans = {}  # options changed: scripts may load, unload or reorder
        super().trigger(event)
        if configure:
            self._plans = {}

    def _plan(self, event: hooks.Hook) -> list[list[Callable]]:
        plan = self._plans.get(event.name)
        if plan is None:
            plan = []
            for top in self.chain:
                funcs = [func for _, func in self._iter_hooks(top, event)]
                if funcs:
                    plan.append(funcs)
            self._plans[event.name] = plan
        return plan

    async def trigger_event(self, event: hooks.Hook) -> None:
        plan = self._plan(event)
        if plan:
            await self._run(plan, _hook_args(event), 0, 0, None)

    async def _run(self, plan: list[list[Callable]], args: list, i: int, j: int, pending) -> None:
        """Run `plan` from function j of top-level addon i on, awaiting `pending` (what the function
        before it returned) first: an error skips the rest of that addon's tree, AddonHalt the rest."""
        while i < len(plan):
            try:
                if pending is not None:
                    awaiting, pending = pending, None
                    await awaiting
                for func in plan[i][j:]:
                    res = func(*args)
                    if res is not None and inspect.isawaitable(res):
                        await res
            except (exceptions.AddonHalt, exceptions.OptionsError) as e:
                if isinstance(e, exceptions.AddonHalt):
                    return
                raise
            except Exception:
                _addon_error()
            i, j = i + 1, 0

    def start_hook(self, event: hooks.Hook) -> Awaitable | None:
        """What ProxyConnectionHandler.handle_hook does for a connection's hook, without a task:
        run the hook's functions now, up to the first that returns an awaitable. None when all is
        done; else what is left to await (that awaitable and the functions after it, the `update`
        hook, an intercepted flow's resume). mitmcompat.run_hooks_inline calls it."""
        args = _hook_args(event)
        plan = self._plan(event)
        for i, funcs in enumerate(plan):
            try:
                for j, func in enumerate(funcs):
                    res = func(*args)
                    if res is not None and inspect.isawaitable(res):
                        return self._finish_hook(plan, args, i, j + 1, res)
            except (exceptions.AddonHalt, exceptions.OptionsError) as e:
                if isinstance(e, exceptions.AddonHalt):
                    break
                raise
            except Exception:
                _addon_error()
        return self._after_hook(args)

    async def _finish_hook(self, plan, args, i: int, j: int, pending) -> None:
        await self._run(plan, args, i, j, pending)
        rest = self._after_hook(args)
        if rest is not None:
            await rest

    def _after_hook(self, args: list) -> Awaitable | None:
        """handle_lifecycle's `update` for a flow and handle_hook's wait for an intercepted flow."""
        message = args[0] if args else None
        if not isinstance(message, flow.Flow):
            return None
        rest = None
        if self._plans.get("update") != []:
            rest = self.start_hook(hooks.UpdateHook([message]))
        if rest is None and not message.intercepted:
            return None
        return _then_resumed(rest, message)

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        if self._plans.get("update") == []:
            return  # nobody listens to update (no UI): skip building the event
        message = _hook_args(event)[0]
        if isinstance(message, flow.Flow):
            await self.trigger_event(hooks.UpdateHook([message]))


def _addon_error() -> None:
    etype, value, tb = sys.exc_info()
    logging.getLogger(addonmanager.__name__).error(
        f"Addon error: {value}", exc_info=(etype, value, addonmanager.cut_traceback(tb, "trigger_event")))


async def _then_resumed(rest: Awaitable | None, message: flow.Flow) -> None:
    if rest is not None:
        await rest
    await message.wait_for_resume()


_ARG_NAMES: dict[type, tuple[str, ...]] = {}


def _hook_args(event: hooks.Hook) -> list:
    names = _ARG_NAMES.get(type(event))
    if names is None:
        names = _ARG_NAMES[type(event)] = tuple(f.name for f in dataclasses.fields(event))
    return [getattr(event, n) for n in names]


class _LogTuning:
    """Logging without per-record work nobody asked for.

    - mitmproxy installs a handler that turns every log record into a deprecated `add_log` event
      dispatched to every addon (debug records included: several per connection, one per audit
      record). The lean master leaves it out unless a loaded addon still implements `add_log`.
    - mitmproxy sets the root logger to DEBUG so that each handler filters for itself; with only
      the termlog (info) and ErrorCheck (error) listening, every debug call still builds a record
      nobody prints. The root level follows the most verbose handler instead (-v: debug).
    - Every record walks the stack for its caller and looks up its thread, process and asyncio
      task, which no handler here prints (the termlog shows time and message): off, with the
      switches the logging HOWTO documents for that ("Optimization"). mitmproxy logs four lines
      per connection (client/server connect and disconnect): measured 2.77 -> 2.63 ms of CPU per
      new TLS connection.
    """

    name = "easgate-logtuning"

    def __init__(self, m: master.Master) -> None:
        self.master = m
        logging._srcfile = None  # type: ignore[attr-defined]
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
        logging.logAsyncioTasks = False  # type: ignore[attr-defined]  (3.12+)

    def configure(self, updated) -> None:
        self.sync()

    def running(self) -> None:
        from mitmproxy.addonmanager import traverse

        if any(hasattr(a, "add_log") for a in traverse(self.master.addons.chain)):
            self.master._legacy_log_events.install()
        self.sync()

    @staticmethod
    def sync() -> None:
        root = logging.getLogger()
        levels = [h.level for h in root.handlers]
        root.setLevel(min(levels) if levels and min(levels) > logging.NOTSET else logging.DEBUG)


class LeanMaster(master.Master):
    """Only the addons a reverse-proxy gateway needs; gateway addons come from `make_addons`."""

    def __init__(self, opts: options.Options, event_loop=None, with_termlog: bool = True,
                 make_addons: Callable[[], list] | None = None) -> None:
        super().__init__(opts, event_loop=event_loop, with_termlog=with_termlog)
        # the fast dispatcher replaces the stock manager before any addon is added
        opts.changed.disconnect(self.addons._configure_all)
        self.addons = FastAddonManager(self)
        mitmcompat.run_hooks_inline()  # connections' hooks through FastAddonManager.start_hook, no task each
        mitmcompat.lean_connections()  # a connection's own tasks lighter: a timer watchdog, no asyncio.wait
        if self._termlog_addon is not None:
            self.addons.add(self._termlog_addon)
        self._legacy_log_events.uninstall()  # see _LogTuning
        self.addons.add(_LogTuning(self))
        self.addons.add(*(cls() for cls in LEAN))
        self.dormant = Dormant()
        self.addons.register(self.dormant)  # declares options; not in the chain, so never dispatched to
        self.gateway_addons = list(make_addons()) if make_addons else []
        self.addons.add(*self.gateway_addons)
        self.addons.add(errorcheck.ErrorCheck())
        self.activated: list = []

    def activate_dormant(self, forced: set[str]) -> list[str]:
        """Load the dormant addons whose options were set; returns the ignored option names."""
        want, ignored = self.dormant.wanted(self.options, forced)
        opts = self.options
        for a in want:
            # The addon declares its options again on load. mitmproxy compares the raw help text with
            # the stored (reflowed) one, finds them "different" and resets the value: take the
            # declarations out first and put the values back after.
            names = [n for n, owner in self.dormant.owner.items() if owner is a]
            saved = {n: opts._options.pop(n) for n in names if n in opts._options}
            self.addons.register(a)
            for n, old in saved.items():
                if n in opts._options and old.value is not optmanager.unset:
                    opts._options[n].value = old.value
            # mitmdump's order: default addons before the gateway's
            chain = self.addons.chain
            pos = chain.index(self.gateway_addons[0]) if self.gateway_addons else len(chain)
            chain.insert(pos, a)
            self.addons._plans = {}
            self.addons.invoke_addon_sync(a, hooks.ConfigureHook(set(opts.keys())))
            self.activated.append(a)
        return ignored


def skip_message_typechecks() -> None:
    """Drop the per-message type check that mitmproxy compiles out under `python -O`.

    `mitmproxy.http.MessageData.__post_init__` (inside `if __debug__:`) type-checks every field of
    every Request and Response it builds: about 8% of a lean gateway's CPU. The values come from
    mitmproxy's own parsers; the check exists to catch addon programming errors, which the test
    suite still catches under the full master. Nothing else of `-O` (asserts) is changed.
    """
    from mitmproxy import http

    if "__post_init__" in vars(http.MessageData):
        http.MessageData.__post_init__ = lambda self: None


# ------------------------------------------------------------------------------------------------
# The runner


class _PrefixFormatter(logging.Formatter):
    def __init__(self, prefix: str, inner: logging.Formatter) -> None:
        super().__init__()
        self.prefix, self.inner = prefix, inner

    def format(self, record: logging.LogRecord) -> str:
        return self.prefix + self.inner.format(record)


class Ready:
    """Tells the supervisor (through an inherited pipe) that this worker is serving."""

    name = "easgate-ready"

    def __init__(self, fd: int, index: int) -> None:
        self.fd, self.index = fd, index

    def running(self) -> None:
        self._say("ready")

    def not_accepting(self) -> None:
        """The listener is closed: a reload's hand-over may say it is complete."""
        self._say("closed")

    def _say(self, what: str) -> None:
        try:
            os.write(self.fd, f"{what} {self.index} {os.getpid()}\n".encode())
        except OSError:
            pass


def run_master(master_factory: Callable[[options.Options], master.Master], arguments: Sequence[str], *,
               lean: bool, grace_s: float = 10.0, reload_grace_s: float = 3600.0, log_prefix: str = "",
               ready: Ready | None = None, extra: Callable | None = None, check_only: bool = False) -> int:
    """mitmproxy.tools.main.run for `easgate run`; returns the exit status.

    check_only: parse the arguments and configure every addon as a start would, then return
    without serving (the supervisor's pre-flight: a bad `--set` is one error line, not one per
    worker). Only errors are printed.
    """
    from mitmproxy.tools.main import process_options
    from mitmproxy.utils import arg_check, debug

    async def main() -> int:
        logging.getLogger().setLevel(logging.DEBUG)
        for name, level in (("tornado", logging.WARNING), ("asyncio", logging.WARNING),
                            ("hpack", logging.WARNING), ("quic", logging.WARNING)):
            logging.getLogger(name).setLevel(level)
        debug.register_info_dumpers()

        if lean:
            skip_message_typechecks()
        opts = options.Options()
        m = master_factory(opts)
        if check_only and m._termlog_addon is not None:
            m._termlog_addon.uninstall()
            logging.getLogger().addHandler(_errors_only := logging.StreamHandler(sys.stderr))
            _errors_only.setLevel(logging.ERROR)
        if log_prefix and m._termlog_addon is not None:
            h = m._termlog_addon.logger
            h.formatter = _PrefixFormatter(log_prefix, h.formatter)
        parser = cmdline.mitmdump(opts)
        try:
            args = parser.parse_args(list(arguments))
        except SystemExit:
            arg_check.check()
            return 1
        try:
            opts.set(*args.setoptions, defer=True)
            optmanager.load_paths(opts, os.path.join(opts.confdir, "config.yaml"),
                                  os.path.join(opts.confdir, "config.yml"))
            process_options(parser, opts, args)
            if args.options:
                optmanager.dump_defaults(opts, sys.stdout)
                return 0
            if args.commands:
                m.commands.dump()
                return 0
            if extra and args.filter_args:
                opts.update(**extra(args))
            if why := unknown_options(opts, {spec.split("=", 1)[0] for spec in args.setoptions or ()}):
                raise exceptions.OptionsError(why)
            if lean and isinstance(m, LeanMaster):
                gw = next((a for a in m.gateway_addons if isinstance(a, Gateway)), None)
                forced = set(forced_options(gw.config)) if gw and gw.config else set()
                ignored = m.activate_dormant(forced)
                if m.activated:
                    logger.info("easgate: loaded on demand: " + ", ".join(
                        type(a).__name__ for a in m.activated))
                if ignored:
                    logger.warning("easgate: ignored (the gateway configures TLS itself): " + ", ".join(ignored))
        except exceptions.OptionsError as e:
            print(f"easgate: {e}", file=sys.stderr)
            return 1
        if check_only:
            return 0
        if ready is not None:
            m.addons.add(ready)

        loop = asyncio.get_running_loop()
        state: dict = {"stops": 0, "task": None, "deadline": 0.0}

        def _drain(grace: float, why: str) -> None:
            deadline = loop.time() + grace
            if state["task"] is None:
                state["deadline"] = deadline
                state["task"] = loop.create_task(workers.drain(m, grace, why, lambda: state["deadline"],
                                                               ready.not_accepting if ready else None))
            elif deadline < state["deadline"]:
                state["deadline"] = deadline
                logger.info(f"easgate: stopping: requests in flight get {grace:g}s more")

        def _stop(*_):
            state["stops"] += 1
            if state["stops"] == 1 and grace_s > 0:
                _drain(grace_s, "stopping")
            else:
                m.shutdown()

        def _hand_over(*_):  # SIGQUIT from the supervisor: a reload's new workers serve now
            _drain(reload_grace_s, "handing over to the new workers")

        def _hup(*_):
            if ready is not None:  # a worker: the supervisor reloads by replacing its workers
                logger.warning(f"easgate: SIGHUP ignored by a worker: send it to the supervisor "
                               f"(pid {os.getppid()}) to reload")
            else:
                loop.create_task(reload_in_place(m))

        m.easgate_sighup_reloads = True  # the audit trail leaves SIGHUP to us (a reload reopens its log)
        for sig, fn in ((signal.SIGINT, _stop), (signal.SIGTERM, _stop), (signal.SIGQUIT, _hand_over),
                        (signal.SIGHUP, _hup)):
            try:
                loop.add_signal_handler(sig, fn)
            except NotImplementedError:  # pragma: no cover
                signal.signal(sig, lambda *_, fn=fn: loop.call_soon_threadsafe(fn))
        if hasattr(signal, "SIGPIPE"):
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        await m.run()
        return 0

    try:
        factory = event_loop_factory()
    except ConfigError as e:
        print(f"easgate: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(main(), loop_factory=factory)
    except SystemExit as e:  # ErrorCheck exits on startup errors
        return e.code if isinstance(e.code, int) else 1


LOOP_ENV = "EASGATE_EVENT_LOOP"


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `easgate run` serves on: asyncio's own (the default), or uvloop's with
    EASGATE_EVENT_LOOP=uvloop when uvloop is installed. A benchmark switch (bench/bench_all.py's
    `+uvloop` variants), not a product option: measured side by side, uvloop did not lower the CPU
    per request of the lean master or of easgate (the cost is in mitmproxy's and easgate's Python,
    not in the loop), so uvloop is no dependency."""
    which = os.environ.get(LOOP_ENV, "").strip().lower() or "asyncio"
    if which == "asyncio":
        return None
    if which != "uvloop":
        raise ConfigError("environment", LOOP_ENV, f"unknown event loop {which!r}", "use asyncio (the default) or uvloop")
    try:
        import uvloop
    except ImportError:
        raise ConfigError("environment", LOOP_ENV, "uvloop is not installed",
                          "pip install uvloop into easgate's venv, or unset EASGATE_EVENT_LOOP") from None
    return uvloop.new_event_loop


async def reload_in_place(m: master.Master) -> None:
    """SIGHUP without a supervisor (`--workers 1`): check the config, then apply it in this process.

    Open connections (held Pings) are not touched; new ones get the new certificate, routes and
    authorization. A config that does not load is refused in one line and the old one stays."""
    gw = next((a for a in m.addons.chain if isinstance(a, Gateway)), None)
    if gw is None:
        logger.warning("easgate: SIGHUP: no gateway in this process; nothing to reload")
        return
    path = m.options.easgate_config
    logger.info(f"easgate: SIGHUP: reloading {path}")
    try:
        await asyncio.to_thread(validate_config, path)  # the whole chain built aside, as at start
    except ConfigError as e:
        logger.error(f"easgate: reload refused, still serving the old config: {e}")
        return
    try:
        gw.configure({"easgate_config"})
    except exceptions.OptionsError as e:  # changed again between the check and now
        logger.error(f"easgate: reload refused, still serving the old config: {e}")
        return
    logger.info("easgate: reload complete: new connections use the new config; open ones keep theirs")


def lean_factory(make_addons: Callable[[], list]) -> Callable[[options.Options], master.Master]:
    return lambda opts: LeanMaster(opts, make_addons=make_addons)


def full_factory(make_addons: Callable[[], list]) -> Callable[[options.Options], master.Master]:
    from mitmproxy.tools.dump import DumpMaster

    class GatewayDumpMaster(DumpMaster):
        def __init__(self, opts, *a, **kw) -> None:
            super().__init__(opts, *a, **kw)
            self.addons.add(*make_addons())

    return GatewayDumpMaster


def mitmdump_filter_extra(args) -> dict:
    """What mitmdump does with a trailing filter expression."""
    v = " ".join(args.filter_args)
    return dict(save_stream_filter=v, readfile_filter=v, dumper_filter=v)
