"""Integrations: safe points at request boundaries, and hooks into servers and clusters.

A web worker spends its life between requests in server code that holds no patched frame:
the end of a request (and the start of the next) is the natural safe point of the
``two_universe`` and ``hybrid`` models, as a system call's exit is for the kernel. The
middlewares here declare it (:func:`livepatch.safepoint`) so a busy worker thread or an
asyncio task serving request after request switches to the new code between two requests.
"""

from __future__ import annotations

from livepatch.integrations.asgi import SafepointASGI
from livepatch.integrations.wsgi import SafepointWSGI

__all__ = ["SafepointASGI", "SafepointWSGI"]
