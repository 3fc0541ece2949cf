"""The local admin socket (the shell): a Unix socket only the proxy's user can use, one JSON
request line in, one JSON response line out. What a request means, how a session is shown
and which sessions a kick ends are decided in ``proxy/admin_protocol.py``; this module reads
the hub's sessions and ends them the way every session ends (``LiveSession.end``: what the
session owes is stored or bounced, never dropped)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .admin_protocol import (KICK_CONDITION, KICK_TEXT, MAX_REQUEST_BYTES, BadRequest,
                             KickRequest, MetricsRequest, SessionSnapshot, encode, error,
                             kick_targets, parse_request, session_row)
from .net.hub import Hub
from .net.live import LiveSession
from .xmpp import codec

REQUEST_TIMEOUT = 5.0  # seconds a client of the socket may take to send its line
KICK_WAIT = 5.0  # seconds a kick waits for the sessions to end before it answers


class AdminSocketError(OSError):
    """The admin socket cannot be set up; the message says where and why."""


def _private_folder(folder: Path) -> None:
    """The socket's folder: made 0700 when missing; an existing one must be the proxy
    user's and writable by nobody else (or another user could put a socket of theirs in
    its place)."""
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise AdminSocketError(f"{folder}: cannot create: {exc.strerror}") from exc
    info = folder.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise AdminSocketError(f"{folder}: not a folder")
    if info.st_uid != os.geteuid():
        raise AdminSocketError(f"{folder}: owned by another user (uid {info.st_uid})")
    if info.st_mode & 0o022:
        raise AdminSocketError(f"{folder}: writable by other users "
                               f"(mode {stat.S_IMODE(info.st_mode):o})")


def _claim(path: Path) -> None:
    """Remove a socket a crashed run left behind; refuse one a running proxy answers on."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise AdminSocketError(f"{path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: stale
        return
    finally:
        probe.close()
    raise AdminSocketError(f"{path}: another running proxy uses this admin socket")


def bind_admin_socket(path: Path) -> socket.socket:
    _private_folder(path.parent)
    _claim(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_mask = os.umask(0o177)  # born 0600: no moment where others may connect
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise AdminSocketError(f"{path}: cannot bind: {exc.strerror or exc}") from exc
    finally:
        os.umask(old_mask)
    os.chmod(path, 0o600)
    sock.listen(16)
    sock.setblocking(False)
    return sock


def snapshot(session: LiveSession, *, finishing: bool = False) -> SessionSnapshot:
    sm = session.sm
    return SessionSnapshot(
        jid=session.jid, edge_state=session.state, upstream_state=session.upstream.state,
        csi_inactive=session.core.client_inactive,
        finishing=finishing, client_address=session.client_address, since=session.since,
        sm_queue=len(sm.unacked) if sm is not None else 0,
        outbox=session.upstream.outbox.size)


class AdminServer:
    def __init__(self, path: Path, hub: Hub, log: Any,
                 gather: Callable[[], Iterable[str]] | None = None) -> None:
        """``gather``: the process's metrics, for a ``metrics`` request (a worker's)."""
        self.path = path
        self.hub = hub
        self.gather = gather
        self.log = log.bind(admin_socket=str(path))
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        sock = bind_admin_socket(self.path)
        self.server = await asyncio.start_unix_server(self._serve, sock=sock,
                                                      limit=MAX_REQUEST_BYTES)
        self.log.info("admin_listening", path=str(self.path))

    async def stop(self) -> None:
        """Close and remove the socket (only one this proxy bound: never another's)."""
        server, self.server = self.server, None
        if server is None:
            return
        server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
                response = await self.answer(parse_request(line))
            except BadRequest as exc:
                response = error(str(exc))
            except ValueError:  # readline's: a line over the limit
                response = error(f"a request is one line of at most {MAX_REQUEST_BYTES} bytes")
            except TimeoutError:
                response = error("no request line in time")
            writer.write(encode(response))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (ConnectionError, TimeoutError, OSError):
            pass  # the client of the socket went away; nothing of the proxy's is at stake
        except Exception:
            self.log.exception("admin_request_failed")
        finally:
            writer.close()

    async def answer(self, request: Any) -> dict[str, Any]:
        if isinstance(request, KickRequest):
            return await self.kick(request)
        if isinstance(request, MetricsRequest):
            if self.gather is None:
                return error("no metrics here")
            return {"ok": True, "metrics": "".join(f"{line}\n" for line in self.gather())}
        rows = [session_row(snapshot(s)) for s in self.hub.sessions]
        rows += [session_row(snapshot(s, finishing=True))
                 for s in self.hub.finishing_sessions if isinstance(s, LiveSession)]
        return {"ok": True, "sessions": rows}

    async def kick(self, request: KickRequest) -> dict[str, Any]:
        live = {s.jid: s for s in self.hub.sessions if s.state != "ended"}
        targets = kick_targets(request.jid, list(live))
        if not targets:
            return error(f"no live session of {request.jid}")
        client_error = codec.stream_error(KICK_CONDITION, KICK_TEXT)
        ending = []
        for jid in targets:
            session = live[jid]
            session.log.info("session_kicked", by="admin socket", target=str(request.jid),
                             condition=KICK_CONDITION)
            ending.append(asyncio.ensure_future(session.end(
                "kicked by an administrator", client_error=client_error)))
        _done, pending = await asyncio.wait(ending, timeout=KICK_WAIT)
        return {"ok": True, "kicked": targets, "still_ending": len(pending)}
