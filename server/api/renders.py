"""Batch renders: a driving video or driving landmarks in, an H.264 mp4 out."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from engine.errors import InvalidLandmarks, InvalidVideo, ResolutionTooHigh, VideoTooLarge, VideoTooLong
from server.api.deps import AppState, owner, service, state
from server.errors import (
    IdentityNotFound,
    IdentityNotReady,
    InvalidRequest,
    PayloadTooLarge,
    QueueFull,
    RenderNotDone,
    RenderNotFound,
    Unauthorized,
    UnsupportedMediaType,
    error_responses,
)
from server.schemas import RenderCreated, RenderLandmarksCreate, RenderPublic
from server.service import Service
from server.uploads import receive_json, receive_upload

router = APIRouter(prefix="/v1", tags=["renders"])

_RENDER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary", "description": "driving video"}},
                }
            },
            "application/json": {"schema": RenderLandmarksCreate.model_json_schema()},
        },
    }
}
_WAIT = Query(0.0, ge=0.0, description="long-poll: wait up to this many seconds for the render to settle")


@router.post(
    "/identities/{identity_id}/renders", status_code=202, response_model=RenderCreated, openapi_extra=_RENDER_BODY,
    summary="Render an identity driven by a video (multipart) or by landmarks (JSON)",
    responses=error_responses(Unauthorized, IdentityNotFound, IdentityNotReady, VideoTooLarge, VideoTooLong,
                              ResolutionTooHigh, InvalidVideo, InvalidLandmarks, UnsupportedMediaType,
                              PayloadTooLarge, InvalidRequest, QueueFull),
)
async def create_render(identity_id: str, request: Request, response: Response, who: str = Depends(owner),
                        st: AppState = Depends(state)) -> RenderCreated:
    identity = await st.service.ready_identity(identity_id, who)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        body = await receive_json(request, st.settings.max_json_bytes)
        record = await st.service.create_render_from_landmarks(identity, who, body)
    else:
        await st.service.precheck_upload()
        upload = await receive_upload(request, st.registry.temp_path(".upload"), st.settings.max_upload_bytes)
        record = await st.service.create_render_from_video(identity, who, upload)
    url = f"/v1/renders/{record.id}"
    response.headers["Location"] = url
    return RenderCreated(id=record.id, status=record.state, status_url=url)


@router.get("/renders/{render_id}", response_model=RenderPublic, summary="A render's state and progress",
            responses=error_responses(Unauthorized, RenderNotFound))
async def get_render(render_id: str, wait: float = _WAIT, who: str = Depends(owner),
                     svc: Service = Depends(service)) -> RenderPublic:
    return await svc.get_render(render_id, who, wait)


@router.get(
    "/renders/{render_id}/video", response_class=FileResponse, summary="The rendered H.264 mp4",
    responses={200: {"content": {"video/mp4": {}}}, **error_responses(Unauthorized, RenderNotFound, RenderNotDone)},
)
async def render_video(render_id: str, who: str = Depends(owner), svc: Service = Depends(service)) -> FileResponse:
    return FileResponse(await svc.render_video(render_id, who), media_type="video/mp4",
                        filename=f"{render_id}.mp4")


@router.delete(
    "/renders/{render_id}", summary="Cancel an unfinished render (200, its state) or delete a finished one (204)",
    responses={200: {"model": RenderPublic}, 204: {"description": "deleted"},
               **error_responses(Unauthorized, RenderNotFound)},
)
async def delete_render(render_id: str, who: str = Depends(owner), svc: Service = Depends(service)) -> Response:
    view = await svc.delete_render(render_id, who)
    if view is None:
        return Response(status_code=204)
    return JSONResponse(view.model_dump(mode="json"))
