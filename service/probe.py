"""`python -m service.probe`: exit 0 when the server in this container is ready (GET /readyz is 200), else 1.

The image's HEALTHCHECK runs it, so the image needs no curl. It reads the REST port from
LSTM_SERVE_HTTP_PORT (default 8000) and asks 127.0.0.1.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("LSTM_SERVE_HTTP_PORT", "8000")
    scheme, context = "http", None
    if os.environ.get("LSTM_SERVE_TLS_CERT"):
        # NOTE: a local probe of our own port: encrypted, without checking the name (with mutual TLS the
        # server also wants a client certificate: probe gRPC health with a client certificate instead)
        scheme, context = "https", ssl._create_unverified_context()
    try:
        with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/readyz", timeout=2, context=context) as r:
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
