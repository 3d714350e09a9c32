"""The server's one port: websockets for clients and submissions, HTTP for the API.

The websockets library hands every handshake to ``process_request``: a
request without ``Upgrade: websocket`` goes to the HTTP API; a websocket's
bearer token is checked there, so a bad token never opens a websocket (401
and a one-line reason; a database that cannot be reached to check it, 503).
A client's first messages may ride its upgrade request (see
:mod:`remote_gpu_core.protocol.upgrade`): the 101 then says they are read.
Compression is off (variables are raw binary,
where deflate costs 40× the throughput) and ``max_size`` is the protocol's
frame size. A request that repeats a header the server acts on
(``Authorization``, ``Upgrade``, ``Origin``) is refused with 400 (403 for
``Origin``), before anything else.

A websocket handshake with a bulk-stream ticket
(:data:`~remote_gpu_core.bulk_stream.TICKET_HEADER`, and the same token) is
the client's bulk stream (see :mod:`..connections.bulk`): a ticket not
given to a connection of that token's user, used, or expired is refused
with 403; a good one's connection leaves websocket framing as its 101 is
done: it says :data:`~remote_gpu_core.bulk_stream.READY` and its transport goes to
the connection that asked for the ticket.

Each user holds at most ``--max-connections-per-user`` websockets at once
(see :mod:`.user_connections`): one more is refused with 429 and a
one-line reason. When websockets close, the heap they grew is given back
to the system (:mod:`.heap_trim`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from remote_gpu_core.bulk_stream import READY, TICKET_HEADER
from remote_gpu_core.errors import ProtocolError
from remote_gpu_core.protocol import CHUNK_SIZE, upgrade
from remote_gpu_core.protocol.piece_reader import install as install_piece_reader

from ..errors import TokenError
from ..connections.bulk import BulkTickets, ConnectionBulk
from ..connections.heap_trim import HeapTrimmer
from .http_api import SUBMIT_PATH, HttpApi, json_response
from .headers import HeaderError, bearer_token, is_websocket, single_header
from ..connections.limits import FRAMES_QUEUED, Limits
from .origins import OriginPolicy
from ..store import DatabaseUnavailable, TokenInfo
from ..connections.per_user import UserConnections

__all__ = ["FrontDoor", "bearer_token"]

log = logging.getLogger("remote_gpu_server")

#: Serves one client's websocket once its token is known.
ClientHandler = Callable[[ServerConnection, TokenInfo], Awaitable[None]]


class _PieceConnection(ServerConnection):
    """A websocket connection whose received bytes are kept as they came
    (:mod:`remote_gpu_core.protocol.piece_reader`): a frame is copied once."""

    def __init__(self, protocol: Any, *args: Any, **kwargs: Any) -> None:
        install_piece_reader(protocol)
        super().__init__(protocol, *args, **kwargs)


class FrontDoor:
    """Call :meth:`open`, then :meth:`close` at the end."""

    def __init__(self, *, verify: Callable[[str | None], Awaitable[TokenInfo]], http: HttpApi,
                 clients: ClientHandler, server_header: str, origins: OriginPolicy | None = None,
                 admit: Callable[[str], str | None] = lambda user: None,
                 max_connections: int = Limits().max_connections, bulk: BulkTickets | None = None) -> None:
        self._origins = origins or OriginPolicy(())
        # None if a user may use workers here, else why not (a server that
        # cannot isolate workers serves one user).
        self._admit = admit
        self._verify = verify
        self._http = http
        self._clients = clients
        self._server_header = server_header
        #: Open websockets per user (``--max-connections-per-user``).
        self.connections = UserConnections(max_connections)
        self.heap = HeapTrimmer()
        # The token of each websocket accepted at its handshake, until it closes.
        self._tokens: dict[ServerConnection, TokenInfo] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._bulk = bulk
        # Bulk streams: the connection a handshake's ticket opened one for.
        self._bulk_owners: dict[ServerConnection, ConnectionBulk] = {}
        self._server: Server | None = None
        self.port = 0

    async def open(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._server = await serve(
            self._handle, host, port,
            process_request=self._handshake,
            process_response=self._answered,
            compression=None,
            max_size=CHUNK_SIZE,
            max_queue=FRAMES_QUEUED,
            write_limit=4 * CHUNK_SIZE,
            server_header=self._server_header,
            ssl=ssl_context,
            create_connection=_PieceConnection,
        )
        sockets = self._server.sockets
        self.port = sockets[0].getsockname()[1] if sockets else port

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await self.heap.close()

    async def _handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        # A browser page of another site must not reach a client's API: the
        # Origin is checked before anything else (CVE-2014-3429 was its absence).
        try:
            websocket = is_websocket(request)
            token = bearer_token(request) if websocket else None
            first = single_header(request, upgrade.FIRST_MESSAGES) if websocket else None
            ticket = single_header(request, TICKET_HEADER) if websocket else None
            if first is not None:
                upgrade.first_frames(first)  # its connection reads them: base64, or refused here
        except (HeaderError, ProtocolError) as exc:
            log.info("refused a request from %s: %s", connection.remote_address, exc)
            return json_response(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        refused = self._origins.refusal(request.headers.get_all("Origin"))
        if refused is not None:
            log.info("refused a request from %s: %s", connection.remote_address, refused)
            if websocket:
                return connection.respond(HTTPStatus.FORBIDDEN, f"{refused}\n")
            return json_response(HTTPStatus.FORBIDDEN, {"error": refused})
        if not websocket:
            return await self._http.handle(connection, request)
        try:
            info = await self._verify(token)
        except TokenError as exc:
            # The reason names the token's id at most, never the token itself.
            log.info("refused a connection from %s: %s", connection.remote_address, exc)
            return connection.respond(HTTPStatus.UNAUTHORIZED, f"{exc}\n")
        except DatabaseUnavailable as exc:
            log.warning("refused a connection from %s: %s", connection.remote_address, exc)
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE,
                                      "the server's database is unavailable; try again shortly\n")
        if ticket is not None:
            owner = (self._bulk.take(ticket, info.user) if self._bulk is not None
                     else "this server offers no bulk stream")
            if isinstance(owner, str):
                log.warning("refused a bulk stream of %s from %s: %s", info.user, connection.remote_address, owner)
                return connection.respond(HTTPStatus.FORBIDDEN, f"{owner}\n")
            self._bulk_owners[connection] = owner
        refusal = self._admit(info.user)
        if refusal is not None:
            log.info("refused a connection of %s: %s", info.user, refusal)
            return connection.respond(HTTPStatus.FORBIDDEN, f"{refusal}\n")
        refusal = self.connections.take(info.user)
        if refusal is not None:
            log.warning("refused a connection of %s from %s: %s", info.user, connection.remote_address,
                        refusal)
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, f"{refusal}\n")
        self._tokens[connection] = info
        # Given back once the connection is gone, whether or not its
        # handshake completed and its handler ran.
        watcher = asyncio.get_running_loop().create_task(connection.wait_closed())
        watcher.add_done_callback(lambda _: self._gone(connection, info.user))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return None

    def _answered(self, connection: ServerConnection, request: Request, response: Response) -> None:
        """A client's websocket whose first messages ride its upgrade request:
        the 101 says they are read (its :class:`Connection` reads them first)."""
        if (response.status_code == HTTPStatus.SWITCHING_PROTOCOLS and request.path != SUBMIT_PATH
                and upgrade.FIRST_MESSAGES in request.headers):
            response.headers[upgrade.FIRST_MESSAGES] = upgrade.READ

    def _gone(self, connection: ServerConnection, user: str) -> None:
        self._tokens.pop(connection, None)
        self._bulk_owners.pop(connection, None)
        self.connections.give_back(user)
        self.heap.soon()  # what its buffers grew goes back to the system

    async def _handle(self, ws: ServerConnection) -> None:
        info = self._tokens.get(ws)
        if info is None:  # it closed before its handler ran
            return
        owner = self._bulk_owners.pop(ws, None)
        if owner is not None:
            await self._carry_bulk(ws, owner)
            return
        if ws.request is not None and ws.request.path == SUBMIT_PATH:
            await self._http.submit_over_websocket(ws, info)
            return
        await self._clients(ws, info)

    @staticmethod
    async def _carry_bulk(ws: ServerConnection, owner: ConnectionBulk) -> None:
        """Say READY, the websocket's last message, and hand its transport to
        ``owner``'s bulk stream, with no await between (nothing the client sends
        after reading READY can reach the websocket); hold the handler until the
        stream ends. The websocket is over at once: it sends no pings and no
        close frame (they would be bytes in the stream), and it no longer counts
        among its user's connections (one stream per connection, opened by that
        connection's ticket)."""
        if ws.keepalive_task is not None:
            ws.keepalive_task.cancel()
        ws.protocol.send_binary(READY)
        ws.send_data()
        stream = owner.attach(ws.transport)
        ws.connection_lost(None)  # its transport no longer tells it anything
        try:
            await stream.wait_closed()
        finally:
            stream.close()
