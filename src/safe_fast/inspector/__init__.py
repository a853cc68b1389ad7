"""The browser inspector: a page that watches a running server over its own protocol.

``attach_realtime_server(..., inspector=True)`` calls :func:`install_inspector`,
which adds plain ``GET`` routes to the WebSocket port:

==============================  =================================================
path                            answer
==============================  =================================================
``/``                           the page (``static/index.html``)
``/inspector/inspector.js``     its client logic, one ES module
``/inspector/inspector.css``    its style sheet
``/inspector/share-data.json``  the ShareData ids and their function ids
==============================  =================================================

Theory of operation
-------------------

The page is a client like any other: it opens the server's WebSocket path
from the browser's own ``WebSocket`` and speaks the public protocol
(subscribe, propose, ping). Nothing here gives it a back door; the only
extra is the read-only listing, because the protocol has no message that
lists ShareData. The listing holds ids and function ids, nothing else (no
state, no history): the state is read over the WebSocket, where
``authorize_subscribe`` applies.

The listing is guarded by the server's own ``authenticate``, called with the
listing request (its ``?token=`` or ``Authorization`` header), so it answers
exactly what the WebSocket upgrade would: 401 where the upgrade would be
refused. That is how the page tells a refused token apart from a server
that is down. A browser cannot see the status of a refused WebSocket
upgrade (its script only gets a close with code 1006), so the page asks for
the listing first on every connection attempt and reads the 401 there.
When ``authorize_subscribe`` is a plain function, the listing leaves out the
ids that the caller may not subscribe to.

Routes are synchronous (picows decides HTTP answers inside its handshake),
so an ``authenticate`` or ``authorize_subscribe`` that is a coroutine
function cannot be awaited here. The listing then answers 501 with a JSON
reason, and the page connects anyway and lets you type an id: the WebSocket
path still authenticates (closing with 4002 on refusal) and authorizes every
subscribe. An awaitable verdict of ``authorize_subscribe`` hides that id.

The static files are package data, read once at installation; the page
fetches nothing from anywhere else, and its Content-Security-Policy says so.
"""

from __future__ import annotations

import html
import inspect
import logging
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable, Optional

import orjson

from ..server.http import HttpResponse
from ..server.request import UpgradeRequest

if TYPE_CHECKING:
    from ..server.server import RealtimeServer

__all__ = ["install_inspector", "share_data_listing", "LISTING_PATH", "PAGE_PATH"]

logger = logging.getLogger("safe_fast.inspector")

PAGE_PATH = "/"
LISTING_PATH = "/inspector/share-data.json"

_STATIC_ROUTES = {
    PAGE_PATH: ("index.html", "text/html; charset=utf-8"),
    "/inspector/inspector.js": ("inspector.js", "text/javascript; charset=utf-8"),
    "/inspector/inspector.css": ("inspector.css", "text/css; charset=utf-8"),
}

_WEBSOCKET_PATH_PLACEHOLDER = "{{WEBSOCKET_PATH}}"

_SECURITY_HEADERS = {
    # Everything comes from this server; the WebSocket is on the same host.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

AuthorizeSubscribe = Callable[[Any, str], Any]


def install_inspector(server: "RealtimeServer", *, authorize_subscribe: Optional[AuthorizeSubscribe] = None) -> None:
    """Add the inspector's routes to ``server`` (a :class:`RealtimeServer`).

    ``authorize_subscribe`` is the server's hook of that name; the listing
    uses it to leave out what the caller may not subscribe to.
    """
    static = resources.files(__package__).joinpath("static")
    for route, (name, content_type) in _STATIC_ROUTES.items():
        body = static.joinpath(name).read_bytes()
        if name == "index.html":
            body = body.replace(
                _WEBSOCKET_PATH_PLACEHOLDER.encode(), html.escape(server.path, quote=True).encode()
            )
        server.add_http_route(route, _static_handler(HttpResponse(200, body, content_type, _SECURITY_HEADERS)))

    def listing(request: UpgradeRequest) -> HttpResponse:
        return _listing_response(server, authorize_subscribe, request)

    server.add_http_route(LISTING_PATH, listing)


def share_data_listing(
    manager: Any, context: Any = None, authorize_subscribe: Optional[AuthorizeSubscribe] = None
) -> list[dict[str, Any]]:
    """``[{"id": ..., "functionIds": [...]}, ...]``: what the manager holds.

    Only functions with an id (the ones reachable over the wire) are named.
    With ``authorize_subscribe``, ids it does not admit for ``context`` are
    left out (a refusal, an exception or an awaitable verdict all hide it).
    """
    entries = []
    for share_data in manager.get_all_share_data():
        if authorize_subscribe is not None and not _admits(authorize_subscribe, context, share_data.id):
            continue
        function_ids = [function.id for function in share_data.functions if function.id is not None]
        entries.append({"id": share_data.id, "functionIds": function_ids})
    return entries


def _static_handler(response: HttpResponse) -> Callable[[UpgradeRequest], HttpResponse]:
    def handler(request: UpgradeRequest) -> HttpResponse:
        return response

    return handler


def _listing_response(
    server: "RealtimeServer", authorize_subscribe: Optional[AuthorizeSubscribe], request: UpgradeRequest
) -> HttpResponse:
    try:
        context = server.authenticate(request)
    except Exception:
        logger.debug("authenticate raised on the inspector listing; answering 401", exc_info=True)
        context = None
    if inspect.isawaitable(context):
        _discard(context)
        return _json(
            HTTPStatus.NOT_IMPLEMENTED,
            {
                "error": "the listing cannot check credentials here: this server's authenticate is a"
                " coroutine function; subscribe by id instead"
            },
        )
    if not context:
        return _json(
            HTTPStatus.UNAUTHORIZED,
            {"error": "unauthorized: the token is missing, expired or not signed by a trusted issuer"},
            {"WWW-Authenticate": "Bearer"},
        )
    return _json(HTTPStatus.OK, {"shareData": share_data_listing(server.manager, context, authorize_subscribe)})


def _admits(authorize_subscribe: AuthorizeSubscribe, context: Any, share_data_id: str) -> bool:
    try:
        verdict = authorize_subscribe(context, share_data_id)
    except Exception:
        logger.debug("authorize_subscribe raised for %r on the inspector listing", share_data_id, exc_info=True)
        return False
    if inspect.isawaitable(verdict):
        _discard(verdict)
        return False
    return bool(verdict)


def _discard(awaitable: Any) -> None:
    """Drop an awaitable nobody will await, without a 'never awaited' warning."""
    close = getattr(awaitable, "close", None) or getattr(awaitable, "cancel", None)
    if close is not None:
        close()


def _json(status: int, payload: Any, headers: Optional[dict[str, str]] = None) -> HttpResponse:
    return HttpResponse(status, orjson.dumps(payload), "application/json", {**_SECURITY_HEADERS, **(headers or {})})
