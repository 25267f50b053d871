"""Why `livepatch attach` refused a process, or why an attach it tried did not work.

The two outcomes are kept apart because they leave the target in different states. A
refusal (`AttachRefused`) happens before anything touches the process: nothing was
loaded, the process never noticed. A failure (`AttachFailed`) happens after the
injection stub was loaded: the process keeps running as before, but the stub's helper
thread may still start the agent later (for example once a long C call releases the
GIL), so the message says what was seen and what to check.
"""

from __future__ import annotations

from livepatch.errors import PatchError


class AttachRefused(PatchError):
    """The process was not touched: it cannot or must not get an agent injected."""

    code = "attach-refused"


class AttachFailed(PatchError):
    """The stub was injected but the agent did not come up (in time, or at all)."""

    code = "attach-failed"
