"""ASGI: a middleware that marks each request boundary as a safe point.

Wrap the application (``app = SafepointASGI(app)``). Every ASGI connection runs in its own
asyncio Task, which is a task of its own to the consistency models; the middleware
declares a safe point for that task before the application handles the scope and after
it returns. Lifespan scopes pass straight through.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from livepatch.transition import safepoint

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class SafepointASGI:
    """ASGI middleware: a safe point before and after every request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        safepoint()
        try:
            await self.app(scope, receive, send)
        finally:
            safepoint()
