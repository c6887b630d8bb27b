"""Route dependencies: the app's service objects and the caller's identity (API keys)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

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


def state(request: Request) -> AppState:
    st: AppState = request.app.state.aca
    return st


def service(request: Request) -> Service:
    return state(request).service


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
    digest = hash_key(key.strip())
    # Compare against every known hash, without stopping early, so timing says nothing about which matched.
    matched = False
    for h in hashes:
        matched |= hmac.compare_digest(h, digest)
    if not matched:
        raise Unauthorized("the API key is not valid")
    return digest
