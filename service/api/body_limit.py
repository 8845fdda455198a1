"""A score request's body is read no further than ``intake.max_request_bytes``.

A photo's own limit (``intake.max_image_bytes``) applies once its bytes are in hand: without a limit on
the body, Starlette spooled a multipart part whole (to disk past 1 MB) before the route read its first
``max_image_bytes + 1`` (a 200 MB part was written out in full), and a JSON body was read whole before
its base64 was measured; a batch of 100 listings could carry 800 photos. Plain ASGI, so it costs the
hot path nothing beyond a wrapped ``receive``.

A declared Content-Length over the limit is answered at once (413, the service's JSON error, nothing
read); a body that grows past it as it streams (chunked) is read no further: ``receive`` raises where
the route reads it, and the request is answered with the same 413 whatever the app made of that.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import ApiError, error_body


class BodyTooLargeError(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "too_large", f"the request body is larger than {limit} bytes "
                         "(COUNTERLENS_INTAKE__MAX_REQUEST_BYTES)", "body")


class ScoreBodyLimit:
    """Limits the body of requests whose path starts with one of ``prefixes``."""

    def __init__(self, app: ASGIApp, limit: int, prefixes: tuple[str, ...] = ("/v1/score",)) -> None:
        self.app = app
        self.limit = limit
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await _answer_413(scope, receive, send, BodyTooLargeError(self.limit))
            return
        seen = 0
        exceeded = started = answered = False

        async def limited() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    exceeded = True
                    raise BodyTooLargeError(self.limit)
            return message

        async def guarded(message: Message) -> None:
            # Once the body is cut off, whatever the app answers (FastAPI turns an error while it parses
            # a body into its own 400) gives way to the 413.
            nonlocal started, answered
            if exceeded and not started:
                if not answered:
                    answered = True
                    await _answer_413(scope, receive, send, BodyTooLargeError(self.limit))
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, guarded)
        except Exception:
            if not exceeded or started:
                raise
            if not answered:
                await _answer_413(scope, receive, send, BodyTooLargeError(self.limit))


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # (the server refuses a malformed one before the app sees it)
    return None


async def _answer_413(scope: Scope, receive: Receive, send: Send, exc: ApiError) -> None:
    response = JSONResponse(error_body(exc.code, exc.message, exc.field), status_code=exc.status,
                            headers={"Connection": "close"})  # the rest of the body is not read
    await response(scope, receive, send)
