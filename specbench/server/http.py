"""Plain GETs for the control plane (health, models, metrics), with the standard library.

The timed requests go through aiohttp (`client`); these few calls are not timed. Neither
reads proxy settings from the environment: the servers are reached directly.
"""

from __future__ import annotations

import urllib.error
import urllib.request

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The bearer token header, when there is a key."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def get(url: str, api_key: str | None = None, timeout_s: float = 10.0) -> tuple[int, str]:
    """The status and body of `GET url`; raises OSError (refused, unreachable, timed out) when nothing answers."""
    request = urllib.request.Request(url, headers=auth_headers(api_key))
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
