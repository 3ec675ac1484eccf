"""Servers, services and service groups -> pools; listeners easgate does not serve."""

from __future__ import annotations

from pathlib import Path

from .model import LbVserver, Member
from .writer import PoolOut


class PoolsMixin:
    """Importer methods for pools (state: see Importer.collect)."""

    def server_of(self, name: str) -> tuple[str, str | None]:
        """(address, why disabled) of `add server` NAME, or NAME itself (an address)."""
        s = self.servers.get(name)
        if s is None:
            return name, None
        self.use("server", name)
        off = f"server {name} is -state DISABLED (line {s.line}: {s.short(130)})" \
            if (s.opt("state") or "").upper() == "DISABLED" else None
        return s.args[1], off

    def pool_members(self, lb: LbVserver) -> list[Member]:
        out = []
        for name, bind in lb.services:
            if name in self.services:
                c = self.services[name]
                self.use("service", name)
                host, off = self.server_of(c.args[1])
                if (c.opt("state") or "").upper() == "DISABLED":
                    off = f"service {name} is -state DISABLED (line {c.line})"
                out.append(Member(name, host, c.args[2].upper(), c.args[3], c, off))
                continue
            g = self.groups[name]
            self.use("service group", name)
            gdis = f"service group {name} is -state DISABLED (line {g.line})" \
                if (g.opt("state") or "").upper() == "DISABLED" else None
            for m in self.group_members.get(name, []):
                host, off = self.server_of(m.args[1])
                if (m.opt("state") or "").upper() == "DISABLED":
                    off = f"member {m.args[1]}:{m.args[2]} is -state DISABLED (line {m.line})"
                out.append(Member(f"{name} {m.args[1]}:{m.args[2]}", host, g.args[1].upper(), m.args[2], m, gdis or off))
        return out

    def member_url(self, m: Member) -> tuple[str | None, str | None]:
        if m.name in self.o.services:
            hp = self.o.services[m.name]
        else:
            host = self.value(m.host)
            if ":" in host and not host.startswith("["):
                host = f"[{host}]"
            hp = f"{host}:{m.port}"
        if m.proto == "HTTP":
            return "http", hp
        if m.proto == "SSL":
            return "https", hp
        self.untranslated(m.cmd.line, f"{m.name} is {m.proto}: easgate pools speak HTTP or HTTPS only")
        return None, None

    def build_pool(self, lb: LbVserver) -> "PoolOut | None":
        p = PoolOut(lb.name)
        p.comments.append(f"line {lb.cmd.line}: {lb.cmd.short()}")
        live = 0
        for m in self.pool_members(lb):
            if m.disabled:
                p.comments.append(f"{m.name} left out: {m.disabled}, out of rotation as on NetScaler")
                continue
            scheme, hp = self.member_url(m)
            if scheme is None:
                continue
            p.comments.append(f"line {m.cmd.line}: {m.cmd.short()}")
            url = f"{scheme}://{hp}"
            p.servers.append((url, "FILL IN" if "FILL-IN" in url else None))
            p.https = p.https or scheme == "https"
            live += 1
        if not p.servers:
            return None
        if lb.addressable:
            p.comments.append(f"lb vserver {lb.name} also listens on {lb.ip}:{lb.port} itself: see NOT TRANSLATED")
        if live > 1:
            p.comments.append("NetScaler's -lbMethod is not carried over: easgate balances round robin")
        if p.https:
            ca = self.o.pool_ca.get(lb.name)
            p.ca = str(Path(ca).expanduser().resolve()) if ca else None
            p.sni = self.o.pool_sni.get(lb.name)
            if not p.ca:
                p.comments.append("NetScaler does not verify back-end certificates by default; easgate does, with the")
                p.comments.append("system trust store: set ca (and sni for an IP address), or verify: false")
                self.notes.append(f"pool {lb.name}: easgate verifies the https back end; give its CA "
                                  f"(--pool-ca {lb.name}=FILE, --pool-sni {lb.name}=NAME) or set verify: false")
        return p

    def listeners_not_served(self, cs_name: str | None, used: list[str], callout) -> None:
        for lb in self.lbs.values():
            if lb.addressable:
                self.untranslated(lb.cmd.line, f"lb vserver {lb.name} listens on its own address {lb.ip}:{lb.port} "
                                               f"({lb.proto}); easgate serves only the cs vserver's listener: run a "
                                               "second easgate/proxy for it")
        for b in self.ssl_binds:
            if b.opt("policyname") is not None or b.args[0] == cs_name or b.args[0] in self.cs:
                continue  # another cs vserver's binding: part of an object not translated (counted as unused)
            lb = self.lbs.get(b.args[0])
            if lb is None:
                self.untranslated(b.line, f"bind ssl vserver: no vserver named '{b.args[0]}'")
            elif lb.addressable:
                self.untranslated(b.line, f"bind ssl vserver {lb.name}: belongs to the listener of lb vserver "
                                          f"{lb.name}, which is not translated")
            # a certificate on a non-addressable lb vserver is never shown to a client: nothing to do
        for name, sets in self.ssl_set.items():
            if name != cs_name and name not in self.cs and name not in self.lbs:
                for c in sets:
                    self.untranslated(c.line, f"set ssl vserver: no vserver named '{name}'")
