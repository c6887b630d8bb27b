"""Route dependencies: the app's service objects and the caller's identity (API keys)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from fastapi import Request, WebSocket

from server.broker.base import Broker
from server.errors import Unauthorized
from server.metrics import Metrics
from server.registry import Registry
from server.service import Service
from server.settings import Settings, hash_key

#: The owner of every resource when no API keys are configured.
ANONYMOUS = ""


@dataclass
class AppState:
    """Everything the routes share, created once by the app's lifespan (server/app.py)."""

    settings: Settings
    registry: Registry
    broker: Broker
    service: Service
    metrics: Metrics
    key_hashes: frozenset[str]
    # The live sessions' hub (server/live.py LiveHub), made on first use by ``live_hub``.
    live: Any = None


def state(request: Request) -> AppState:
    st: AppState = request.app.state.aca
    return st


def service(request: Request) -> Service:
    return state(request).service


def live_hub(st: AppState) -> Any:
    """The app's ``server.live.LiveHub``."""
    if st.live is None:
        from server.live import LiveHub

        st.live = LiveHub(st.settings, st.broker, st.metrics)
    return st.live


def owner(request: Request) -> str:
    """The caller's owner id: the SHA-256 of its bearer key, or ANONYMOUS when keys are off.

    Raises Unauthorized (401) for a missing or unknown key when ``ACA_API_KEYS`` is set.
    """
    hashes = state(request).key_hashes
    if not hashes:
        return ANONYMOUS
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("this route needs an 'Authorization: Bearer <API key>' header")
    return check_key(hashes, key)


def ws_owner(websocket: WebSocket) -> str:
    """``owner`` for a websocket: the bearer header, or ``?access_token=KEY`` (browsers cannot set headers on a
    websocket)."""
    hashes = state(websocket).key_hashes  # type: ignore[arg-type]  # HTTPConnection has .app like Request
    if not hashes:
        return ANONYMOUS
    scheme, _, key = websocket.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        key = websocket.query_params.get("access_token", "")
    if not key.strip():
        raise Unauthorized("send 'Authorization: Bearer <API key>' or ?access_token=<API key>")
    return check_key(hashes, key)


def check_key(hashes: frozenset[str], key: str) -> str:
    digest = hash_key(key.strip())
    # Compare against every known hash, without stopping early, so timing says nothing about which matched.
    matched = False
    for h in hashes:
        matched |= hmac.compare_digest(h, digest)
    if not matched:
        raise Unauthorized("the API key is not valid")
    return digest
