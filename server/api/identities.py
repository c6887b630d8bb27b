"""/v1/identities: upload a reference video, follow its ingest, list, fetch the appearance map, delete."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse

from engine.errors import InvalidVideo, ResolutionTooHigh, VideoTooLarge, VideoTooLong
from server.api.deps import AppState, owner, service, state
from server.errors import (
    IdentityNotFound,
    IdentityNotReady,
    InvalidRequest,
    PayloadTooLarge,
    QueueFull,
    Unauthorized,
    UnsupportedMediaType,
    error_responses,
)
from server.schemas import IdentityCreated, IdentityList, IdentityPublic
from server.service import Service
from server.uploads import receive_upload

router = APIRouter(prefix="/v1/identities", tags=["identities"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "the reference video"},
                        "name": {"type": "string", "maxLength": 200, "description": "a label for people"},
                    },
                }
            }
        },
    }
}
_WAIT = Query(0.0, ge=0.0, description="long-poll: wait up to this many seconds for the ingest to settle")


@router.post(
    "", status_code=202, response_model=IdentityCreated, openapi_extra=_UPLOAD_BODY,
    summary="Upload a reference video; its ingest is queued",
    responses=error_responses(Unauthorized, VideoTooLarge, VideoTooLong, ResolutionTooHigh, InvalidVideo,
                              UnsupportedMediaType, PayloadTooLarge, InvalidRequest, QueueFull),
)
async def create_identity(request: Request, response: Response, who: str = Depends(owner),
                          st: AppState = Depends(state)) -> IdentityCreated:
    await st.service.precheck_upload()
    upload = await receive_upload(request, st.registry.temp_path(".upload"), st.settings.max_upload_bytes)
    record = await st.service.create_identity(who, upload)
    url = f"/v1/identities/{record.id}"
    response.headers["Location"] = url
    return IdentityCreated(id=record.id, status=record.status, status_url=url)


@router.get("", response_model=IdentityList, summary="The caller's identities",
            responses=error_responses(Unauthorized))
async def list_identities(who: str = Depends(owner), svc: Service = Depends(service)) -> IdentityList:
    return IdentityList(items=await svc.list_identities(who))


@router.get("/{identity_id}", response_model=IdentityPublic, summary="An identity's status and ingest report",
            responses=error_responses(Unauthorized, IdentityNotFound))
async def get_identity(identity_id: str, wait: float = _WAIT, who: str = Depends(owner),
                       svc: Service = Depends(service)) -> IdentityPublic:
    return await svc.get_identity(identity_id, who, wait)


@router.get(
    "/{identity_id}/appearance-map.png", response_class=FileResponse,
    summary="The appearance map (Delaunay mesh over the references' head poses) as a PNG",
    responses={200: {"content": {"image/png": {}}}, **error_responses(Unauthorized, IdentityNotFound,
                                                                        IdentityNotReady)},
)
async def appearance_map(identity_id: str, who: str = Depends(owner), svc: Service = Depends(service)) -> FileResponse:
    return FileResponse(await svc.appearance_map(identity_id, who), media_type="image/png")


@router.delete("/{identity_id}", status_code=204, summary="Delete an identity (cancels its ingest)",
               responses=error_responses(Unauthorized, IdentityNotFound))
async def delete_identity(identity_id: str, who: str = Depends(owner), svc: Service = Depends(service)) -> Response:
    await svc.delete_identity(identity_id, who)
    return Response(status_code=204)
