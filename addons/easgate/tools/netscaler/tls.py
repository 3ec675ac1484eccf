"""Certificates, chains, client-certificate mode and revocation -> the `tls` block."""

from __future__ import annotations

from pathlib import Path

from .commands import PLACEHOLDER, Cmd
from .writer import TlsOut

BUILTIN_PROFILE = "ns_default_ssl_profile"


class TlsMixin:
    """Importer methods for the `tls` block (state: see Importer.collect)."""

    def resolve_file(self, name: str, path: str | None, kind: str) -> tuple[str | None, str | None]:
        """A certkey's or CRL's file: --cert NAME=FILE, else DIR/<file name>, else DIR/NAME.pem."""
        bare = name[1:-1] if PLACEHOLDER.fullmatch(name) else name
        for k in (name, bare):
            if k in self.o.certs:
                pem, key = self.o.certs[k]
                return str(Path(pem).expanduser().resolve()), str(Path(key).expanduser().resolve()) if key else None
        if self.o.certs_dir:
            cands = [Path(path).name] if path else []
            if kind == "certkey":
                cands += [f"{bare}.pem", bare]
            for cand in cands:
                p = self.o.certs_dir / cand
                if p.is_file():
                    return str(p.resolve()), None
        return None, None

    def resolve_cert(self, name: str) -> tuple[str, str | None, bool, str | None]:
        """certkey -> (pem path, key path, is a placeholder, hint)."""
        bare = name[1:-1] if PLACEHOLDER.fullmatch(name) else name
        self.use("ssl certKey", name)
        ck = self.certkeys.get(name)
        hint = None
        cert = key = None
        if ck is not None:
            cert, key = ck.opt("cert"), ck.opt("key")
            hint = f"certKey {name} (line {ck.line}): -cert {cert}" + (f" -key {key}" if key else "")
        pem, kp = self.resolve_file(name, cert, "certkey")
        if pem:
            if kp is None and key and self.o.certs_dir and name not in self.o.certs and bare not in self.o.certs:
                k = self.o.certs_dir / Path(key).name
                kp = str(k.resolve()) if k.is_file() else None
            return pem, kp, False, hint
        self.fill_in.add(f"CERTKEY-{bare}")
        return f"FILL-IN-CERTKEY-{bare}.pem", None, True, hint

    def chain_of(self, name: str) -> list[tuple[str, Cmd]]:
        out, seen = [], {name}
        while (ln := self.links.get(name)) is not None and ln.args[1] not in seen:
            name = ln.args[1]
            seen.add(name)
            self.use("ssl certKey", name)
            out.append((name, ln))
        return out

    def check_chain(self, name: str, pem: str, fill: bool, t: "TlsOut") -> None:
        """`link ssl certKey`: NetScaler sends the linked chain; easgate sends what the PEM holds."""
        chain = self.chain_of(name)
        if not chain:
            return
        names = " -> ".join(n for n, _ in chain)
        t.chain = names
        need = 1 + (len(chain) - 1 if len(chain) > 1 else 1)  # the top of a longer chain is the root
        if fill:
            return
        try:
            have = Path(pem).read_text(errors="replace").count("-----BEGIN CERTIFICATE-----")
        except OSError:
            return  # `easgate check` says the file is missing
        if have < need:
            self.untranslated(chain[0][1].line, f"certKey {name} is linked to {names} (NetScaler sends that chain); "
                                                f"{pem} holds {have} certificate(s): clients that lack the "
                                                f"intermediate cannot verify the gateway; give --cert {name}=FILE "
                                                "with leaf, chain and key")

    def client_auth(self, cs_name: str | None) -> tuple[str, str | None]:
        """tls.client_certs.mode from `set ssl vserver` or the ssl profile it names."""
        mode, src = "off", None
        for c in self.ssl_set.get(cs_name or "", []):
            sources = [c]
            if c.opt("sslprofile"):
                pname = c.opt("sslprofile")
                prof = self.ssl_profiles.get(pname)
                if prof is not None:
                    self.use("ssl profile", pname)
                    sources = [prof, c]
                    if (prof.opt("hsts") or "").upper() == "ENABLED":
                        self.untranslated(prof.line, f"ssl profile {pname}: -HSTS ENABLED: easgate does not insert "
                                                     "Strict-Transport-Security")
                elif not pname.startswith(BUILTIN_PROFILE):
                    self.weakens(c.line, f"set ssl vserver {cs_name} -sslProfile {pname}: no such profile in the "
                                         "file; its client-certificate settings are unknown (mode: off written)")
            for s in sources:
                auth = (s.opt("clientauth") or "").upper()
                cc = (s.opt("clientcert") or "").upper()
                if auth == "ENABLED":
                    mode = {"MANDATORY": "required", "OPTIONAL": "optional", "": "required"}.get(cc, "?")
                    if mode == "?":
                        self.untranslated(s.line, f"-clientCert {s.opt('clientcert')} is not Optional or Mandatory")
                        mode = "required"
                    src = f"line {s.line}: {s.short()}"
                elif auth == "DISABLED":
                    mode, src = "off", f"line {s.line}: {s.short()}"
        return mode, src

    def revocation(self, b: Cmd, name: str) -> tuple[dict, list[str]]:
        """The CA entry's revocation keys from -ocspCheck/-crlCheck, the CA's OCSP responder and CRL."""
        notes: list[str] = []
        entry: dict = {}
        modes = {}
        for opt in ("ocspcheck", "crlcheck"):
            if opt in b.opts:
                v = (b.opt(opt) or "").lower()
                if v in ("optional", "mandatory"):
                    modes[opt] = v
                else:
                    self.untranslated(b.line, f"bind ssl vserver -certkeyName {name} -CA: {b.spelled(opt)} "
                                              f"{b.opt(opt)} is not Optional or Mandatory")
        if not modes:
            return entry, notes
        if len(set(modes.values())) > 1:
            self.weakens(b.line, f"CA {name}: -ocspCheck {modes['ocspcheck'].title()} with -crlCheck "
                                 f"{modes['crlcheck'].title()}: easgate has one revocation mode per CA and accepts a "
                                 "certificate either source vouches for")
        entry["revocation"] = "mandatory" if "mandatory" in modes.values() else "optional"
        if "ocspcheck" in modes:
            ob = self.ocsp_binds.get(name)
            if ob is not None:
                resp = self.ocsp_responders.get(ob.opt("ocspresponder"))
                if resp is None:
                    self.untranslated(ob.line, f"bind ssl certKey {name}: no ssl ocspResponder named "
                                               f"'{ob.opt('ocspresponder')}'")
                else:
                    self.use("ssl ocspResponder", resp.args[0])
                    url = resp.opt("url") or ""
                    notes.append(f"line {ob.line}: {ob.short()}")
                    notes.append(f"line {resp.line}: {resp.short()}")
                    if url.startswith("http://"):
                        entry["ocsp_url"] = url
                    else:
                        self.weakens(resp.line, f"ssl ocspResponder {resp.args[0]}: -url {url} is not http://; "
                                                "easgate asks the responder in the certificate's AIA instead")
                    if (resp.opt("resptimeout") or "").isdigit():
                        entry["ocsp_timeout_ms"] = max(1, min(int(resp.opt("resptimeout")), 60_000))
                    cache = (resp.opt("cache") or "DISABLED").upper()
                    minutes = resp.opt("cachetimeout") or "1"
                    entry["ocsp_cache_max_s"] = int(minutes) * 60 if cache == "ENABLED" and minutes.isdigit() else 0
                    if "trustresponder" in resp.opts:
                        notes.append("-trustResponder: NetScaler does not check the answer's signature; easgate does")
            else:
                notes.append("OCSP responder from the certificate's AIA, as on NetScaler without -ocspResponder")
        else:
            entry["ocsp"] = False
        if "crlcheck" in modes:
            crl = self.crls.get(name)
            if crl is None:
                msg = (f"CA {name}: -crlCheck {modes['crlcheck'].title()} but no `add ssl crl ... -CAcert {name}`")
                if modes["crlcheck"] == "mandatory":
                    self.untranslated(b.line, msg + ": NetScaler rejects every certificate of this CA")
                else:
                    notes.append(msg + ": no effect on NetScaler either")
                if "ocspcheck" not in modes:
                    del entry["revocation"], entry["ocsp"]
            else:
                self.use("ssl crl", crl.args[0])
                path, _ = self.resolve_file(crl.args[0], crl.args[1], "crl")
                notes.append(f"line {crl.line}: {crl.short()}")
                if path is None:
                    self.fill_in.add(f"CRL-{crl.args[0]}")
                    path = f"FILL-IN-CRL-{crl.args[0]}.crl"
                    notes.append(f"FILL IN: copy {crl.args[1]} from the appliance (--cert {crl.args[0]}=FILE or --certs DIR)")
                entry["crl"] = path
        return entry, notes

    def build_tls(self, cs_name: str | None) -> "TlsOut":
        t = TlsOut()
        server_certs = [b for b in self.ssl_binds if b.args[0] == cs_name and b.opt("certkeyname")
                        and "ca" not in b.opts]
        ca_binds = [b for b in self.ssl_binds if b.args[0] == cs_name and b.opt("certkeyname") and "ca" in b.opts]
        if server_certs:
            b = server_certs[0]
            if "snicert" in b.opts:
                self.untranslated(b.line, "an -SNICert binding: easgate serves one certificate")
            name = b.opt("certkeyname")
            pem, key, fill, hint = self.resolve_cert(name)
            t.cert = (pem, key, f"line {b.line}: {b.short()}", hint, fill, name)
            self.check_chain(name, pem, fill, t)
            for extra in server_certs[1:]:
                self.untranslated(extra.line, "a second server certificate (SNI): easgate serves one certificate")
        else:
            t.cert = ("FILL-IN-CERTKEY-server-certificate.pem", None, "no `bind ssl vserver ... -certkeyName` for "
                      "the cs vserver", None, True, "server-certificate")
            self.fill_in.add("CERTKEY-server-certificate")
        t.mode, t.mode_line = self.client_auth(cs_name)
        for b in ca_binds:
            name = b.opt("certkeyname")
            pem, _key, fill, hint = self.resolve_cert(name)
            entry, notes = self.revocation(b, name)
            t.cas.append((pem, f"line {b.line}: {b.short()}", hint, fill, name, notes, entry))
        if t.mode != "off" and not t.cas:
            self.untranslated(0, f"cs vserver {cs_name} asks for client certificates but has no `-CA` binding")
        if t.mode == "off" and t.cas:
            self.notes.append(f"cs vserver {cs_name}: -CA bindings without -clientAuth ENABLED: no certificate is asked for")
        return t

    # -- output ------------------------------------------------------------------------------------
