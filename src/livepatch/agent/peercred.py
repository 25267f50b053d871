"""Who is on the other end of a Unix socket, as the kernel says (SO_PEERCRED).

The credentials are those of the process that called connect(), recorded by the kernel at
that moment; the peer cannot forge them. The agent serves its own user and root only:
being able to change a process's code is the same power as being able to ptrace it.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }


@dataclass(frozen=True)
class Peer:
    """The credentials of a connected client."""

    pid: int
    uid: int
    gid: int

    def to_dict(self) -> dict[str, int]:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid}


def peer_of(sock: socket.socket) -> Peer:
    """The kernel-recorded credentials of the process connected to `sock`."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid=pid, uid=uid, gid=gid)


def allowed(peer: Peer, owner_uid: int | None = None) -> bool:
    """Same user as this process, or root."""
    owner = os.getuid() if owner_uid is None else owner_uid
    return peer.uid == owner or peer.uid == 0
