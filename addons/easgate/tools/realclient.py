"""pyactivesync, a real EAS 16.1 client, set up to talk to a gateway: `easgate demo --real`'s client.

pyactivesync builds `https://<server>/Microsoft-Server-ActiveSync` itself and has no option for a
CA file or a client certificate, so `EasClient` sets them on the `requests.Session` it keeps in
`Client._transport.session` (requests' own `verify`/`cert` attributes; the only private name used).
`trust_env` is switched off there: requests lets `REQUESTS_CA_BUNDLE`/`CURL_CA_BUNDLE` from the
environment override `session.verify`, and proxy variables must not divert loopback traffic.

Provision against a server without a device policy (SOGo): it answers Provision Status 1 with a
Policy Status 2 ("no policy for this client", [MS-ASPROV] 2.2.2.54.1) and no PolicyKey, so
pyactivesync's `provision()` raises; MS-ASPROV lets such a client go on without a policy key, and
`EasClient.provision` does so (returns None).

    python -m easgate.tools.realclient --server localhost:8443 --ca certs/public-ca.pem \\
        --user alice --password alice-pw --device-id DEMOIPHONE01 [--cert P --key K] inbox
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import requests
from pyactivesync import Client, FolderType
from pyactivesync.exceptions import EASError, ProvisionError


class EasClient(Client):
    """pyactivesync's Client with a CA file, an optional client certificate, and no-policy servers."""

    def __init__(self, server: str, login: str, password: str, *, device_id: str, ca: Path | str,
                 cert: tuple[Path | str, Path | str] | None = None, device_type: str = "pyactivesync",
                 timeout: float = 30.0) -> None:
        super().__init__(server, login, password, device_id=device_id, device_type=device_type, timeout=timeout)
        s: requests.Session = self._transport.session
        s.trust_env = False
        s.verify = str(ca)
        if cert:
            s.cert = (str(cert[0]), str(cert[1]))

    def provision(self) -> str | None:
        """The PolicyKey, or None when the server has no policy for this device (SOGo)."""
        try:
            return super().provision()
        except ProvisionError as e:
            if "no PolicyKey" not in str(e):
                raise
            self._provisioned = True
            return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m easgate.tools.realclient",
                                description="Sync a mailbox through the gateway with pyactivesync")
    p.add_argument("--server", required=True, help="gateway HOST:PORT")
    p.add_argument("--ca", required=True, help="CA file that issued the gateway's certificate")
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--device-id", required=True)
    p.add_argument("--cert", help="device client certificate (PEM)")
    p.add_argument("--key", help="its private key")
    p.add_argument("action", choices=["inbox"], help="inbox: provision, list folders, sync the inbox")
    a = p.parse_args(argv)
    cert = (a.cert, a.key or a.cert) if a.cert else None
    try:
        with EasClient(a.server, a.user, a.password, device_id=a.device_id, ca=a.ca, cert=cert) as c:
            key = c.provision()
            print(f"Provision: {'PolicyKey ' + key if key else 'no policy for this device'}")
            folders = c.list_folders()
            print("FolderSync: " + ", ".join(f.name for f in folders))
            inbox = next(f for f in folders if f.type == FolderType.INBOX)
            sync_key, items = "0", []
            for _ in range(5):
                r = c.sync_folder(inbox.id, sync_key=sync_key)
                items += r.added
                if items and not r.more_available:
                    break
                sync_key = r.sync_key
            print(f"Sync {inbox.name}: {len(items)} message(s)")
            for i in items:
                print(f"  {i.fields.get('Email.From', '')}: {i.fields.get('Email.Subject', '')}")
    except requests.HTTPError as e:
        print(f"error: the gateway answered HTTP {e.response.status_code} to {e.request.url.split('?')[1]}",
              file=sys.stderr)
        return 1
    except (requests.RequestException, EASError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
