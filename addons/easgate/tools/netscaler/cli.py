"""`easgate import-netscaler`: the argparse glue, the report on stderr and the exit status."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

from .importer import import_netscaler
from .lexer import NotText, decode, printable
from .model import Options, UsageError

EXIT_OK, EXIT_NOT_TRANSLATED, EXIT_UNREADABLE, EXIT_WEAKER = 0, 1, 2, 3



def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for v in values or ():
        k, sep, val = v.partition("=")
        if not sep or not k or not val:
            raise UsageError(f"{what} {v}: expected NAME=VALUE")
        out[k.strip("[]")] = val
    return out


def _err(msg: str) -> None:
    print(printable(msg), file=sys.stderr)


def cmd_import(args) -> int:
    try:
        raw = Path(args.file).read_bytes()
    except OSError as e:
        _err(f"easgate import-netscaler: cannot read {args.file}: {e.strerror}")
        return EXIT_UNREADABLE
    try:
        text, decoded = decode(raw)
    except NotText:
        _err(f"easgate import-netscaler: {args.file} is not a text file (it holds NUL bytes)")
        return EXIT_UNREADABLE
    try:
        certs = {}
        for k, v in _pairs(args.cert, "--cert").items():
            pem, _, key = v.partition(",")
            certs[k] = (pem, key or None)
        opts = Options(sets=_pairs(args.set, "--set"), certs=certs,
                       certs_dir=Path(args.certs) if args.certs else None,
                       services=_pairs(args.service, "--service"),
                       pool_ca=_pairs(args.pool_ca, "--pool-ca"), pool_sni=_pairs(args.pool_sni, "--pool-sni"),
                       vserver=args.vserver)
        # millions of small objects and no reference cycles: the cyclic collector would only rescan
        # them, again and again (twice the time of a 50,000-line import)
        gc.disable()
        yaml_text, imp = import_netscaler(text, args.file, opts)
    except UsageError as e:
        _err(f"easgate import-netscaler: {e}")
        return EXIT_UNREADABLE
    finally:
        gc.enable()
    if args.output:
        Path(args.output).write_text(yaml_text)
    else:
        sys.stdout.write(yaml_text)
    f = args.file
    if imp.weaker:
        _err(f"{f}: WEAKER THAN NETSCALER: {len(imp.weaker)} difference(s) let through what the appliance blocks "
             "(exit status 3):")
        for r in sorted(imp.weaker, key=lambda r: r.line):
            _err(f"{f}:{r.line}: weaker: {r.message}")
    for r in sorted(imp.reports, key=lambda r: r.line):
        _err(f"{f}:{r.line}: not translated: {r.message}")
    if decoded:
        _err(f"{f}: note: {decoded}")
    for n in imp.notes:
        _err(f"{f}: note: {n}")
    if imp.fill_in:
        _err(f"{f}: note: values to fill in (FILL-IN-...): " + ", ".join(sorted(imp.fill_in))
             + " (--set NAME=VALUE, --cert CERTKEY=FILE)")
    if imp.unused or imp.appliance:
        _err(f"{f}: note: {imp.unused_line()}")
        if args.verbose:
            for u in imp.unused:
                _err(f"{f}: not used: {u}")
            for a in imp.appliance:
                _err(f"{f}: appliance setting: {a}")
    if imp.weaker:
        return EXIT_WEAKER
    return EXIT_NOT_TRANSLATED if imp.reports else EXIT_OK


def add_commands(sub) -> None:
    s = sub.add_parser(
        "import-netscaler", help="translate a NetScaler CLI configuration into an easgate config (YAML)",
        description="Print an easgate config reproducing a NetScaler configuration (ns.conf CLI lines). "
                    "Differences that make the result weaker than the appliance (fail mode, authorization "
                    "coverage, client certificates, revocation, header insertion) come first, then what "
                    "cannot be translated, each with its line number, on stderr and at the top of the YAML. "
                    "Exit status: 0 all translated, 1 something not translated (the YAML is still printed), "
                    "2 unreadable input or bad option, 3 the result is weaker than NetScaler (the YAML is "
                    "still printed; do not switch over before each item is resolved).",
    )
    s.add_argument("file", help="NetScaler CLI lines, e.g. ns.conf")
    s.add_argument("--vserver", metavar="NAME",
                   help="the cs vserver to translate (default: the one whose traffic responder policies "
                        "guard, else the one carrying ActiveSync, else the first)")
    s.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="fill the placeholder [NAME] of the file (repeatable), e.g. --set EXCHANGESERVER-IP=10.0.0.5")
    s.add_argument("--cert", action="append", metavar="CERTKEY=PEM[,KEY]",
                   help="the PEM file of a certkey (server certificate: leaf + chain + key) or of an "
                        "`add ssl crl` object, repeatable")
    s.add_argument("--certs", metavar="DIR", help="look up certkey NAME as DIR/NAME.pem (or the -cert file name), "
                                                  "and a CRL by its file name")
    s.add_argument("--service", action="append", metavar="SERVICE=HOST:PORT",
                   help="send a service's traffic to HOST:PORT instead (e.g. a test stand-in)")
    s.add_argument("--pool-ca", action="append", metavar="LBVSERVER=PEM",
                   help="CA file that verifies the https servers of an lb vserver's pool")
    s.add_argument("--pool-sni", action="append", metavar="LBVSERVER=NAME",
                   help="server name (SNI, verified) for an lb vserver's https servers")
    s.add_argument("-v", "--verbose", action="store_true",
                   help="list the objects the translated cs vserver does not use and the appliance settings")
    s.add_argument("-o", "--output", help="write the YAML here instead of stdout")
    s.set_defaults(fn=cmd_import)
