"""easgate: a secure mail gateway for Exchange ActiveSync, built as mitmproxy addons."""

__version__ = "0.1.0"
