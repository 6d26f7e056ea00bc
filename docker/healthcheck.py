"""Container health probe: ``python healthcheck.py [PATH]`` GETs ``http://127.0.0.1:$MEMCAST_PORT/PATH``.

Exit status 0 on a 2xx answer, 1 otherwise (refused, timed out, 4xx/5xx). The image is
python:3.11-slim, which has no curl or wget; this uses the standard library only, so it runs
with any Python in the image. Used by the Dockerfile's HEALTHCHECK (``/healthz``) and by
docker-compose.yml (``/readyz``).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def probe(path: str, port: str, timeout: float) -> str | None:
    """None when healthy, else the reason."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if 200 <= response.status < 300:
                return None
            return f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except (OSError, ValueError) as exc:  # URLError, refused, timeout, malformed URL
        return f"{url}: {exc}"


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    port = os.environ.get("MEMCAST_PORT", "8000")
    reason = probe(path, port, timeout=4.0)  # below the HEALTHCHECK --timeout of 5s
    if reason is not None:
        sys.stderr.write(f"unhealthy: {reason}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
