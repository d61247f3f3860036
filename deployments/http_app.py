"""The HTTP surface around the router: the FastAPI app, OpenAI-shaped error handlers, the body-size limit
and the API-key check."""

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from types import SimpleNamespace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import APIError

logger = logging.getLogger("ray.serve")


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator when the response ends for any reason, a client that went away included,
    so the generator's cleanup (releasing the workers' sessions) runs now rather than whenever the
    abandoned generator is garbage-collected; then awaits `on_close`, which runs even where the body never
    started (closing a generator that never ran does not run its `finally`)."""

    def __init__(self, content, *, on_close: Callable[[], Awaitable[None]] | None = None, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self.body_iterator.aclose())
            if self.on_close is not None:
                await asyncio.shield(self.on_close())


api = FastAPI(title="SpecKV", description="Adaptive speculative decoding, OpenAI-compatible.")
# What the middleware below reads, set by the router replica in this process. Not `api.state`: Serve's
# ingress serves a copy of `api` made when the deployment class is wrapped, so state set on the module's
# `api` at replica start is not on the app that handles requests.
SETTINGS = SimpleNamespace()


@api.exception_handler(APIError)
async def _api_error(_: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    """Framework-level 4xx (a body that is not JSON or not UTF-8, an unknown route or method) in OpenAI's shape."""
    error = APIError(e.status_code, str(e.detail), code="invalid_body" if e.status_code == 400 else None)
    return JSONResponse(error.body(),
                        status_code=e.status_code, headers=getattr(e, "headers", None))


@api.exception_handler(Exception)
async def _unexpected_error(_: Request, e: Exception) -> JSONResponse:
    """Anything unforeseen still answers in OpenAI's error shape (and is logged with its traceback)."""
    logger.exception("unhandled error")
    return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", type_="server_error").body(),
                        status_code=500)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    errors = e.errors()
    first = errors[0] if errors else {}
    def where(err: dict) -> str:
        return ".".join(str(x) for x in err.get("loc", []) if x not in ("body",) and not isinstance(x, int))

    loc = where(first).split(".") if where(first) else []
    message = "; ".join(f"{where(err) or 'body'}: {err.get('msg')}" for err in errors[:5])
    return JSONResponse(APIError(400, message, param=".".join(loc) or None, code=first.get("type")).body(),
                        status_code=400)


def _authorized(request: Request) -> bool:
    keys: frozenset[str] = getattr(SETTINGS, "api_keys", frozenset())
    if not keys or request.url.path.endswith("/healthz"):
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip(), k) for k in keys)


class BodyLimit:
    """ASGI middleware: a request body over `SETTINGS.max_body_bytes` gets 413, whether it declares its
    length (refused before reading) or arrives chunked without Content-Length (refused once the bytes read
    pass the limit, without reading the rest). A body within the limit is passed on unchanged."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        limit = getattr(SETTINGS, "max_body_bytes", None)
        if scope["type"] != "http" or not limit:
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await self._too_large(limit, scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                return await self._too_large(limit, scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(limit: int, scope, receive, send) -> None:
        response = JSONResponse(APIError(413, f"request body over {limit} bytes", code="body_too_large").body(),
                                status_code=413)
        await response(scope, receive, send)


api.add_middleware(BodyLimit)  # inside the API-key check below (middleware added later runs first)


@api.middleware("http")
async def _auth(request: Request, call_next):
    if not _authorized(request):
        return JSONResponse(APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                     code="invalid_api_key").body(),
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)
