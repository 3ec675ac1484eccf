"""The lean master of `easgate run` WITHOUT easgate's addons: the honest baseline for easgate's own cost.

    .venv/bin/python bench/lean_bare.py --mode reverse:http://127.0.0.1:8000@127.0.0.1:0 \
        --certs '*=gateway-full.pem' --set flow_detail=0

Same master, same dispatcher and logging tuning, same mitmproxy; mitmproxy's TlsConfig serves the
certificate (easgate's TlsOffload is an easgate addon). Used by bench/bench_all.py; not a product.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addons"))

from mitmproxy.addons import tlsconfig

from easgate.runtime.lean import lean_factory, run_master


def main() -> int:
    return run_master(lean_factory(lambda: [tlsconfig.TlsConfig()]), sys.argv[1:], lean=True, grace_s=0)


if __name__ == "__main__":
    sys.exit(main())
