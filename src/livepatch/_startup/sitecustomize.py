"""Startup hook used by `livepatch run`: start the agent, then step aside.

`livepatch run` puts this directory first on PYTHONPATH and sets LIVEPATCH_AGENT=1, so
every Python process of the command (and its children, which inherit both) imports this
module at startup, before the program's code. It starts the agent, removes itself from
`sys.path`, and imports the `sitecustomize` it shadowed, if there is one, so an
environment's own startup customisation keeps working.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))

try:
    from livepatch.agent.boot import from_environment

    from_environment()
except BaseException as _exc:
    print(f"livepatch: agent not started: {type(_exc).__name__}: {_exc}", file=sys.stderr)

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_self = sys.modules.pop("sitecustomize", None)
try:
    import sitecustomize  # noqa: F401 - the shadowed one, if any
except ImportError:
    if _self is not None:
        sys.modules["sitecustomize"] = _self
