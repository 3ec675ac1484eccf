"""`easgate policy check FILE` and `easgate policy install NEW CURRENT`: change a policy safely.

The gateway applies a policy (or inventory) file automatically only when it is *replaced* (a new
file renamed over the old one): a file written in place may be caught half written. `install`
does the safe thing in one command: it copies NEW next to CURRENT (same file system), checks the
copy exactly as the gateway will read it there (relative `inventory_file` paths included), and
renames it over CURRENT. A broken NEW leaves CURRENT untouched.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..authz.policy import Policy, PolicyError, load_policy, parse_policy


def describe(p: Policy) -> str:
    rules = p.command_rules
    extra = "".join(f", {n} {what}" for n, what in ((len(rules.rules), "command rules"),
                                                   (len(rules.rate_limits), "rate limits")) if n)
    return (f"mode {p.mode}, {len(p.allow)} allow and {len(p.deny)} deny entries, "
            f"{len(p.inventory)} inventory devices{extra}")


def _check_inventory(path: Path) -> Policy:
    return parse_policy({"inventory_file": str(path)}, source=None, base_dir=path.parent)


def cmd_check(args) -> int:
    path = Path(args.file)
    try:
        p = _check_inventory(path) if args.inventory else load_policy(path)
    except PolicyError as e:
        print(f"easgate: {e}", file=sys.stderr)
        return 2
    print(f"{path}: OK ({describe(p)})")
    return 0


def cmd_install(args) -> int:
    new, current = Path(args.new), Path(args.current).absolute()
    if not new.is_file():
        print(f"easgate: {new}: no such file (the new version to install)", file=sys.stderr)
        return 2
    if not current.parent.is_dir():
        print(f"easgate: {current.parent}: no such directory (where {current.name} lives)", file=sys.stderr)
        return 2
    # Checked under a name in CURRENT's directory (so relative paths resolve as they will), with
    # CURRENT's suffix (an inventory's type is its suffix).
    fd, tmp_name = tempfile.mkstemp(prefix=f".{current.stem}.", suffix=current.suffix, dir=current.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, open(new, "rb") as src:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())
        if current.exists():
            shutil.copymode(current, tmp)
        try:
            p = _check_inventory(tmp) if args.inventory else load_policy(tmp)
        except PolicyError as e:
            print(f"easgate: {str(e).replace(str(tmp), str(new))}; {current} left as it was", file=sys.stderr)
            return 2
        os.replace(tmp, current)
        dfd = os.open(current.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"installed {new} as {current} ({describe(p)}); a running gateway applies it at its next check")
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("policy", help="check a policy or inventory file, or install a new version safely")
    psub = s.add_subparsers(dest="policy_cmd", required=True)
    c = psub.add_parser("check", help="validate a policy file (or --inventory an inventory file)")
    c.add_argument("file", help="the policy (or, with --inventory, the inventory) file to validate")
    c.add_argument("--inventory", action="store_true", help="FILE is an inventory (.csv/.yaml), not a policy")
    c.set_defaults(fn=cmd_check)
    i = psub.add_parser("install", help="check NEW as it will be read at CURRENT, then rename it over CURRENT")
    i.add_argument("new", help="the new version")
    i.add_argument("current", help="the file the gateway reads (authorization.policy or its inventory_file)")
    i.add_argument("--inventory", action="store_true", help="the files are inventories (.csv/.yaml), not policies")
    i.set_defaults(fn=cmd_install)
