"""`easgate connector` and `easgate devices ...`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from ..authz.revocations import append as append_revocation
from ..core.errors import ConfigError
from ..core.net import parse_listen
from . import store
from .config import load_connector_config
from .inventories import AnyInventory, open_inventory
from .service import serve
from .store import ImportFileError, InventoryError


def add_commands(sub: argparse._SubParsersAction) -> None:
    add_connector_command(sub)
    add_devices_command(sub)


def cmd_connector(args) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_connector_config(args.config)
        if args.listen:
            try:
                host, port = parse_listen(args.listen)
            except ValueError as e:
                raise ConfigError("--listen", "", str(e), "e.g. 127.0.0.1:9080") from None
            cfg = dataclasses.replace(cfg, host=host, port=port)
        return asyncio.run(serve(cfg))
    except ConfigError as e:
        print(f"easgate connector: config error: {e}", file=sys.stderr)
        return 2


def add_connector_command(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("connector", help="run easgate's XNC-compatible connector over the device inventory")
    s.add_argument("config", help="connector YAML, e.g. policies/connector.yaml")
    s.add_argument("--listen", help="HOST:PORT, overriding the config's listen (port 0 picks a free one)")
    s.add_argument("-v", "--verbose", action="store_true", help="log bad requests and reloads")
    s.set_defaults(fn=cmd_connector)


# --------------------------------------------------------------------------------------------
# easgate devices ...


def _open(args) -> AnyInventory:
    db = getattr(args, "db", None)
    config = getattr(args, "config", None)
    if db and config:
        raise InventoryError("pass either --db or --config, not both")
    if config:
        try:
            db = load_connector_config(config).inventory
        except ConfigError as e:
            raise InventoryError(f"config error: {e}")
    db = db or os.environ.get("EASGATE_DEVICES_DB")
    if not db:
        raise InventoryError("no inventory database given; pass --db PATH, or -c CONNECTOR_YAML to use its "
                             "'inventory', or set EASGATE_DEVICES_DB")
    return open_inventory(db, create=args.devices_cmd in ("import", "add"))


def _cmd_import(args) -> int:
    inv = _open(args)
    try:
        report = inv.import_file(args.file, skip_bad=args.skip_bad, replace=args.replace)
    except ImportFileError as e:
        print(e, file=sys.stderr)
        print(f"easgate devices: nothing imported from {args.file}: {len(e.errors)} problem(s); fix them, "
              "or pass --skip-bad to import the good rows", file=sys.stderr)
        return 1
    for err in report.errors[:store.MAX_REPORTED]:
        print(f"skipped {err}", file=sys.stderr)
    if len(report.errors) > store.MAX_REPORTED:
        print(f"... and {len(report.errors) - store.MAX_REPORTED} more", file=sys.stderr)
    print(f"{args.file}: {report.summary()}; {inv.count()} devices in {inv.path}")
    return 0


def _cmd_add(args) -> int:
    inv = _open(args)
    try:
        new = inv.add(args.device_id, args.user, args.type or "", args.model or "",
                      managed=not args.unmanaged, compliant=not args.noncompliant)
    except ValueError as e:
        print(f"easgate devices add: {e}", file=sys.stderr)
        return 2
    print(f"{'added' if new else 'updated'} {args.device_id.strip()} (user {args.user.strip()}, "
          f"{'unmanaged' if args.unmanaged else 'managed'}, {'noncompliant' if args.noncompliant else 'compliant'})")
    return 0


def _cmd_flag(args) -> int:
    inv = _open(args)
    if args.devices_cmd == "remove":
        ok = inv.remove(args.device_id)
    else:
        ok = inv.set_blocked(args.device_id, args.devices_cmd == "block")
    if not ok:
        fix = ("add it first with `easgate devices add ID --user U`, or put it on the policy's deny.devices list"
               if args.devices_cmd == "block" else "check the DeviceId with `easgate devices list`")
        print(f"easgate devices {args.devices_cmd}: no device {args.device_id!r} in {inv.path}; {fix}", file=sys.stderr)
        return 1
    done = {"block": "blocked", "unblock": "unblocked", "remove": "removed"}[args.devices_cmd]
    revocations = getattr(args, "revocations", None) or os.environ.get("EASGATE_REVOCATIONS")
    if revocations and args.devices_cmd in ("block", "unblock"):
        # The connector is asked per request; a request already held open is not. The gateways'
        # revocation file reaches those within a second (authz/revocations.py, docs/scaling.md).
        action = "revoke" if args.devices_cmd == "block" else "restore"
        try:
            append_revocation(Path(revocations), None, args.device_id, "blocked in the connector inventory", action)
        except OSError as e:
            print(f"easgate devices {args.devices_cmd}: {done} {args.device_id} in {inv.path}, but cannot append to "
                  f"{revocations}: {e.strerror}; held requests end at their next re-authorization", file=sys.stderr)
            return 1
        print(f"{done} {args.device_id} (and {'revoked' if action == 'revoke' else 'restored'} in {revocations})")
        return 0
    print(f"{done} {args.device_id}")
    return 0


def _cmd_list(args) -> int:
    inv = _open(args)
    devices = inv.all(args.user)
    if args.json:
        out = sys.stdout
        out.write("[")
        for i, d in enumerate(devices):
            out.write(("," if i else "") + "\n  " + json.dumps(asdict(d), ensure_ascii=False))
        out.write("\n]\n")
        return 0
    yn = {True: "yes", False: "no"}
    print(f"{'device_id':<24} {'user':<24} {'type':<10} {'model':<18} {'managed':<8} {'compliant':<9} "
          f"{'blocked':<7} last_seen")
    n = 0
    for d in devices:
        n += 1
        print(f"{d.device_id:<24} {d.user:<24} {d.device_type:<10} {d.model:<18} {yn[d.managed]:<8} "
              f"{yn[d.compliant]:<9} {yn[d.blocked]:<7} {d.last_seen or '-'}")
    print(f"({n} devices)")
    return 0


def _run(args) -> int:
    try:
        return args.devices_fn(args)
    except InventoryError as e:
        print(f"easgate devices: {e}", file=sys.stderr)
        return 2


def add_devices_command(sub: argparse._SubParsersAction) -> None:
    """`easgate devices --db PATH {import,add,block,unblock,remove,list}`."""
    db_help = ("the inventory database (a SQLite file or a postgresql:// URL), as named by the connector config; "
               "or set EASGATE_DEVICES_DB")
    p = sub.add_parser("devices", help="manage the connector's device inventory (SQLite or PostgreSQL)",
                       description=store.__doc__.split("\n\n")[0])
    cfg_help = "a connector config (policies/connector.yaml): use its 'inventory' database"
    p.add_argument("--db", help=db_help)
    p.add_argument("-c", "--config", help=cfg_help)
    # accepted after the subcommand too; SUPPRESS keeps the subparser from resetting the value
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS, help=db_help)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, help=cfg_help)
    ds = p.add_subparsers(dest="devices_cmd", required=True)

    s = ds.add_parser("import", parents=[common], help="import an MDM export (CSV or YAML)")
    s.add_argument("file", type=Path, help="CSV with a header row, or YAML (docs/connector.md lists the columns)")
    s.add_argument("--skip-bad", action="store_true", help="import the good rows, report the bad ones")
    s.add_argument("--replace", action="store_true", help="the file is the whole inventory: remove unlisted devices")
    s.set_defaults(devices_fn=_cmd_import)

    s = ds.add_parser("add", parents=[common], help="add or replace one device")
    s.add_argument("device_id", help="the ActiveSync DeviceId, e.g. ApplF17ABCDEF01")
    s.add_argument("--user", required=True, help=r"the owner: alice, CONTOSO\alice or alice@contoso.com")
    s.add_argument("--type", help="DeviceType, e.g. iPhone")
    s.add_argument("--model", help="the device model (informational)")
    s.add_argument("--unmanaged", action="store_true", help="not managed by the MDM (default: managed)")
    s.add_argument("--noncompliant", action="store_true", help="not compliant (default: compliant)")
    s.set_defaults(devices_fn=_cmd_add)

    for name, helptext in (("block", "block a device (the connector denies it at once)"),
                           ("unblock", "lift a block"), ("remove", "delete a device")):
        s = ds.add_parser(name, parents=[common], help=helptext)
        s.add_argument("device_id", help="the ActiveSync DeviceId (any case)")
        if name != "remove":
            s.add_argument("--revocations", metavar="FILE",
                           help="also revoke (block) or restore (unblock) the device in the gateways' revocation "
                                "file (their authorization.revocations; or set EASGATE_REVOCATIONS), so requests "
                                "the gateways hold open end within a second")
        s.set_defaults(devices_fn=_cmd_flag)

    s = ds.add_parser("list", parents=[common], help="list devices")
    s.add_argument("--json", action="store_true", help="a JSON array")
    s.add_argument("--user", help="only this user's devices")
    s.set_defaults(devices_fn=_cmd_list)
    p.set_defaults(fn=_run)
