"""NetScaler commands: the verbs the importer knows, their options, and one parsed line (Cmd)."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from .lexer import Token


@dataclass(slots=True)
class Cmd:
    line: int
    text: str
    verb: str  # "add lb vserver"
    args: list[str]
    opts: dict[str, list[str]]  # lower-case option name -> values ([] for a flag)
    written: str = ""  # the verb as written ("add policy httpCallout")

    def opt(self, name: str, default: str | None = None) -> str | None:
        v = self.opts.get(name)
        return " ".join(v) if v else default

    def spelled(self, name: str) -> str:
        """Option `name` as the line writes it (`-ocspCheck`), for messages: looked up in the text
        rather than kept for every line of a 50,000-line file."""
        m = re.search(r"(?<!\S)-(" + re.escape(name) + r")(?!\S)", self.text, re.IGNORECASE)
        return "-" + (m[1] if m else name)

    def short(self, width: int = 110) -> str:
        t = " ".join(self.text.split())
        return t if len(t) <= width else t[: width - 3] + "..."


VERBS = [
    ("add", "service"), ("add", "server"), ("add", "servicegroup"), ("bind", "servicegroup"),
    ("add", "lb", "vserver"), ("bind", "lb", "vserver"),
    ("add", "cs", "vserver"), ("add", "cs", "policy"), ("add", "cs", "action"), ("bind", "cs", "vserver"),
    ("set", "ssl", "vserver"), ("add", "ssl", "action"), ("add", "ssl", "policy"), ("bind", "ssl", "vserver"),
    ("add", "ssl", "certkey"), ("link", "ssl", "certkey"), ("bind", "ssl", "certkey"), ("add", "ssl", "profile"),
    ("bind", "ssl", "profile"), ("add", "ssl", "crl"), ("add", "ssl", "ocspresponder"),
    ("add", "policy", "httpcallout"), ("set", "policy", "httpcallout"),
    ("add", "responder", "policy"), ("add", "responder", "action"), ("set", "responder", "param"),
    ("bind", "responder", "global"), ("add", "lb", "monitor"), ("bind", "lb", "monitor"), ("bind", "service"),
    ("enable", "ns", "feature"), ("save", "ns", "config"),
]
_VERB_INDEX: dict[tuple[str, ...], tuple[str, ...]] = {v: v for v in VERBS}
_VERB_NAMES = {v: " ".join(v) for v in VERBS}
# commands that change nothing easgate would do
HARMLESS_VERBS = {"enable ns feature", "save ns config"}
# appliance-wide settings (addresses, routing, DNS, NTP, users, SNMP, ...): not part of a gateway
# config; counted in one line, listed with --verbose
APPLIANCE_PREFIXES = {
    ("set", "ns"), ("add", "ns"), ("enable", "ns"), ("disable", "ns"), ("bind", "ns"), ("add", "route"),
    ("add", "dns"), ("set", "dns"), ("add", "ntp"), ("set", "ntp"), ("enable", "ntp"), ("set", "system"),
    ("add", "system"), ("bind", "system"), ("add", "snmp"), ("set", "snmp"), ("add", "vlan"), ("bind", "vlan"),
    ("set", "interface"), ("add", "ha"), ("set", "ha"), ("set", "lacp"), ("add", "netprofile"), ("set", "audit"),
    ("add", "audit"), ("set", "cmp"), ("set", "appflow"), ("set", "lb"), ("set", "ssl"), ("set", "cache"),
    ("add", "authentication"), ("set", "aaa"), ("set", "ipsec"), ("set", "l3param"), ("set", "l2param"),
    ("set", "rsskeytype"), ("set", "ip6tunnelparam"), ("set", "iptunnelparam"), ("set", "videooptimization"),
}
# verbs of `set ssl ...` / `set lb ...` that are objects, not appliance parameters
_NOT_APPLIANCE = {("set", "ssl", "vserver"), ("set", "lb", "vserver")}
FLAGS = {"ca", "snicert", "skipcaname", "trustresponder", "encrypted"}
_OPTION = re.compile(r"^-[A-Za-z][A-Za-z0-9_]*$")

# Options easgate ignores on purpose: None = any value; a set = only these values (upper case).
ANY = None
_SERVICE_IGNORED: dict[str, set | None] = {
    "gslb": ANY, "maxclient": ANY, "maxreq": ANY, "cip": {"DISABLED"}, "usip": {"NO"},
    "useproxyport": ANY, "sp": ANY, "clttimeout": ANY, "svrtimeout": ANY, "cka": ANY, "tcpb": ANY,
    "cmp": {"NO"}, "healthmonitor": ANY, "comment": ANY, "appflowlog": ANY, "downstateflush": ANY,
    "maxbandwidth": {"0"}, "monthreshold": ANY, "td": {"0"}, "autoscale": {"DISABLED"},
}
_PROTOCOLS = {"ssl3": {"DISABLED"}, "tls1": {"DISABLED"}, "tls11": {"DISABLED"}, "tls12": {"ENABLED"},
              "tls13": {"ENABLED"}, "sessreuse": ANY, "sesstimeout": ANY, "denysslreneg": ANY, "ersa": ANY,
              "sslredirect": {"DISABLED"}, "snienable": ANY, "dh": {"DISABLED"}, "ersacount": ANY}
IGNORED: dict[str, dict[str, set | None]] = {
    "add service": _SERVICE_IGNORED,
    "add servicegroup": _SERVICE_IGNORED,
    "bind servicegroup": {"weight": ANY, "hashid": ANY, "customserverid": ANY},
    "add server": {"comment": ANY, "td": {"0"}},
    "add lb vserver": {
        "persistencetype": {"NONE"}, "clttimeout": ANY, "lbmethod": ANY, "comment": ANY, "appflowlog": ANY,
        "state": {"ENABLED"}, "downstateflush": ANY, "td": {"0"},
    },
    "bind lb vserver": {"weight": ANY, "gotopriorityexpression": {"END"}, "type": {"REQUEST"}},
    "add cs vserver": {
        "clttimeout": ANY, "comment": ANY, "appflowlog": ANY, "state": {"ENABLED"}, "casesensitive": ANY,
        "persistencetype": {"NONE"}, "downstateflush": ANY, "td": {"0"}, "listenpolicy": {"NONE"},
    },
    "add cs policy": {"comment": ANY},
    "add cs action": {"comment": ANY},
    "bind cs vserver": {"gotopriorityexpression": {"END"}, "type": {"REQUEST"}},
    "set ssl vserver": dict(_PROTOCOLS),
    "add ssl profile": {**_PROTOCOLS, "sslprofiletype": {"FRONTEND"}, "maxage": ANY},
    "bind ssl profile": {"ecccurvename": ANY, "ciphername": ANY, "cipherpriority": ANY},
    "add ssl action": {"comment": ANY},
    "add ssl policy": {"comment": ANY},
    "bind ssl vserver": {"skipcaname": ANY, "gotopriorityexpression": {"END"}, "type": {"REQUEST"},
                         "ecccurvename": ANY, "ciphername": ANY},
    "add ssl certkey": {"inform": {"PEM"}, "expirymonitor": ANY, "notificationperiod": ANY, "bundle": ANY},
    "add ssl crl": {"inform": ANY, "refresh": ANY, "method": ANY, "url": ANY, "server": ANY, "port": ANY,
                    "interval": ANY, "day": ANY, "time": ANY, "basedn": ANY, "binary": ANY, "scope": ANY},
    "add ssl ocspresponder": {"cache": ANY, "batchingdepth": ANY, "batchingdelay": ANY, "trustresponder": ANY,
                              "producedattimeskew": ANY, "usenonce": ANY, "insertclientcert": {"NO"},
                              "httpmethod": ANY, "respondercert": ANY, "signingcert": ANY},
    "add policy httpcallout": {"comment": ANY, "returntype": {"TEXT", "BOOL"}, "httpmethod": {"GET"}, "scheme": ANY},
    "add responder policy": {"comment": ANY, "logaction": ANY, "appflowaction": ANY},
    "add lb monitor": ANY,
    "bind lb monitor": ANY,
    "bind service": ANY,
}
IGNORED["set policy httpcallout"] = IGNORED["add policy httpcallout"]

HANDLED: dict[str, set[str]] = {
    "add service": {"state"}, "add server": {"state"}, "add servicegroup": {"state"},
    "bind servicegroup": {"state", "monitorname"}, "add lb vserver": set(),
    "bind lb vserver": {"policyname", "priority"},
    "add cs vserver": set(), "add cs policy": {"rule", "action"}, "add cs action": {"targetlbvserver"},
    "bind cs vserver": {"policyname", "targetlbvserver", "priority", "lbvserver"},
    "set ssl vserver": {"clientauth", "clientcert", "sslprofile"},
    "add ssl profile": {"clientauth", "clientcert", "hsts"},
    "add ssl action": {"clientcert", "certheader"}, "add ssl policy": {"rule", "action"},
    "bind ssl vserver": {"certkeyname", "ca", "policyname", "priority", "ocspcheck", "crlcheck", "snicert"},
    "add ssl certkey": {"cert", "key"}, "link ssl certkey": set(), "bind ssl certkey": {"ocspresponder", "priority"},
    "add ssl crl": {"cacert"}, "add ssl ocspresponder": {"url", "resptimeout", "cachetimeout"},
    "add policy httpcallout": {"vserver", "ipaddress", "port", "hostexpr", "urlstemexpr", "parameters",
                               "resultexpr", "cacheforsecs"},
    "add responder policy": {"undefaction"}, "add responder action": set(), "set responder param": {"undefaction"},
    "bind responder global": {"priority", "gotopriorityexpression", "type"},
    "enable ns feature": set(), "save ns config": set(),
}
HANDLED["set policy httpcallout"] = HANDLED["add policy httpcallout"]

PLACEHOLDER = re.compile(r"\[([A-Za-z0-9][A-Za-z0-9_.-]*)\]")


def parse_command(no: int, text: str, tokens: list[Token]) -> Cmd | str:
    """A Cmd, or the reason the line is not understood."""
    words = tuple(t.text.lower() for t in tokens[:3])
    verb = _VERB_INDEX.get(words) or _VERB_INDEX.get(words[:2])
    if verb is None:
        if words[:2] in APPLIANCE_PREFIXES and words not in _NOT_APPLIANCE:
            return Cmd(no, text, "appliance", [t.text for t in tokens], {}, " ".join(words[:2]))
        return "unknown command '" + " ".join(t.text for t in tokens[:3]) + "'"
    rest = tokens[len(verb):]
    args: list[str] = []
    opts: dict[str, list[str]] = {}
    cur: str | None = None
    last = ""
    for t in rest:
        if not t.quoted and _OPTION.match(t.text):
            cur = t.text[1:].lower()
            if cur in opts:
                return f"option {t.text} given twice"
            opts[cur] = []
            last = cur
            if cur in FLAGS:
                cur = None
            continue
        if cur is None and not opts:
            args.append(t.text)
        else:  # NetScaler options may take several words (-parameters a(..) b(..), -cip ENABLED X-Header)
            opts[cur or last].append(t.text)
        if cur is not None:
            last = cur
    return Cmd(no, text, _VERB_NAMES[verb], args, opts,
               sys.intern(" ".join(t.text for t in tokens[:len(verb)])))
