"""`python -m service.probe`: exit 0 when the server in this container is ready (GET /readyz is 200), else 1.

The image's HEALTHCHECK runs it, so the image needs no curl. It reads the REST port from
LSTM_SERVE_HTTP_PORT (default 8000) and asks 127.0.0.1.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("LSTM_SERVE_HTTP_PORT", "8000")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
