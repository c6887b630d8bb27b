"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from server import metrics
from server.api.deps import AppState, owner, state
from server.errors import Unauthorized, error_responses
from server.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The API process is alive")
async def healthz(st: AppState = Depends(state)) -> Health:
    return Health(status="ok", broker=st.broker.name)


@router.get("/readyz", response_model=Health, summary="The broker answers and at least one worker is alive",
            responses={503: {"model": Health, "description": "broker unreachable or no live worker"}})
async def readyz(st: AppState = Depends(state)) -> JSONResponse:
    reachable = await st.broker.ping()
    workers = await st.broker.workers() if reachable else []
    ok = reachable and len(workers) > 0
    body = Health(status="ok" if ok else "unavailable", broker=st.broker.name, workers=len(workers),
                  details={"broker_reachable": reachable, "worker_ids": [w.worker_id for w in workers]})
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (text exposition 0.0.4)",
            responses=error_responses(Unauthorized))
async def metrics_endpoint(request: Request, st: AppState = Depends(state)) -> PlainTextResponse:
    if not st.settings.metrics_public:
        owner(request)
    gauges = {"aca_queue_depth": 0.0, "aca_workers_alive": 0.0}
    if await st.broker.ping():
        gauges = {"aca_queue_depth": float(await st.broker.depth()),
                  "aca_workers_alive": float(len(await st.broker.workers()))}
        shared = await st.broker.shared_metrics()
    else:
        shared = {}
    text = metrics.render(st.metrics.snapshot(), shared, gauges)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")
