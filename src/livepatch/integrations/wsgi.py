"""WSGI: a middleware that marks each request boundary as a safe point.

Wrap the application (``app = SafepointWSGI(app)``). Before the wrapped application runs
and after its response iterable is closed, the worker thread declares a safe point: if a
transition is in flight and the thread is behind, it switches there (the call is one
attribute load when no transition runs). The response iterable is passed through
untouched except for ``close()``, so streaming responses keep streaming.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from livepatch.transition import safepoint

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _ClosingIterable:
    """The app's response iterable; declares a safe point once the server closes it."""

    def __init__(self, inner: Iterable[bytes]) -> None:
        self._inner = inner

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._inner)

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            safepoint()


class SafepointWSGI:
    """WSGI middleware: a safe point before and after every request."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        safepoint()
        return _ClosingIterable(self.app(environ, start_response))
