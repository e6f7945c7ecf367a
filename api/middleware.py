"""ASGI middleware of the ingress: request ids, API keys and the body size limit, which every
HTTP request needs, those no route answers included (a 404 carries its request id too). What a
route's request needs besides (its pipeline, context, metrics, errors) is ``api.call.Call``'s.

Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which costs a task and a copy of
every request: this runs on the hot path of every call.
"""

from __future__ import annotations

import hmac
import re
import uuid

from api.errors import asgi_error
from api.metrics import record_of
from core.errors import Forbidden, MMServeError, PayloadTooLarge, Unauthorized

REQUEST_ID_HEADER = "x-request-id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestEnvelope:
    """Gives each request an id (kept from ``x-request-id`` if safe) echoed in the response,
    and refuses bodies over ``max_body_bytes`` with 413 before they reach a route.

    Behind Ray Serve the proxy already assigns ``x-request-id`` and echoes it in every
    response, so ``echo_request_id`` is off there to avoid a second header.

    With ``api_keys``, every path but ``/health`` (and ``open_paths``) needs
    ``Authorization: Bearer <key>``: 401 without one, 403 with a wrong one. Keys are compared in
    constant time, never logged.
    """

    OPEN_PATHS = frozenset({"/health"})

    def __init__(self, app, max_body_bytes: int, echo_request_id: bool = True,
                 api_keys: list[str] | tuple[str, ...] = (), open_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.open_paths = self.OPEN_PATHS | set(open_paths)
        self.max_body_bytes = max_body_bytes
        self.echo_request_id = echo_request_id
        self.api_keys = tuple(k.encode() for k in api_keys)

    def _auth_error(self, authorization: bytes | None) -> MMServeError | None:
        if authorization is None or not authorization.startswith(b"Bearer "):
            return Unauthorized("an API key is required: send Authorization: Bearer <key>")
        given = authorization[len(b"Bearer "):].strip()
        ok = False
        for key in self.api_keys:  # every key, so timing does not tell which one nearly matched
            ok |= hmac.compare_digest(given, key)
        return None if ok else Forbidden("the API key is not valid")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = None
        length = None
        authorization = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                candidate = v.decode("latin-1")
                request_id = candidate if _SAFE_ID.match(candidate) else None
            elif k == b"content-length":
                length = int(v) if v.isdigit() else -1
            elif k == b"authorization":
                authorization = v
        request_id = request_id or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        # CORS preflights carry no credentials; the CORS middleware (or a 405) answers them.
        if self.api_keys and scope["path"] not in self.open_paths and scope["method"] != "OPTIONS":
            denied = self._auth_error(authorization)
            if denied is not None:
                return await self._send_error(send, scope, request_id, denied,
                                              [(b"www-authenticate", b"Bearer")])

        if length is not None and length > self.max_body_bytes:
            return await self._too_large(send, scope, request_id, length)
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # No Content-Length (chunked): read up to the limit, then replay what was read.
            chunks, size, more = [], 0, True
            while more:
                msg = await receive()
                if msg["type"] != "http.request":
                    break
                chunks.append(msg.get("body", b""))
                size += len(chunks[-1])
                more = msg.get("more_body", False)
                if size > self.max_body_bytes:
                    return await self._too_large(send, scope, request_id, size)
            body = b"".join(chunks)
            replayed = False

            async def replay():
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            receive = replay

        if not self.echo_request_id:
            return await self.app(scope, receive, send)
        rid_header = (REQUEST_ID_HEADER.encode(), request_id.encode())

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [rid_header]
            await send(message)

        await self.app(scope, receive, send_with_id)

    async def _too_large(self, send, scope, request_id: str, size: int) -> None:
        err = PayloadTooLarge(f"request body is {size} bytes or more; the limit is "
                              f"{self.max_body_bytes} bytes (server.max_body_bytes)")
        await self._send_error(send, scope, request_id, err, [(b"connection", b"close")])

    async def _send_error(self, send, scope, request_id: str, err: MMServeError, extra: list) -> None:
        rid = request_id if self.echo_request_id else None
        for msg in asgi_error(err, rid, extra, record_of(scope)):
            await send(msg)
