"""The HTTP server around the app: uvicorn, with a deadline for a request's headers and a
bounded drain on shutdown.

uvicorn waits for a request's headers without limit (a client that sends half of them keeps
its connection, and a slot of the OS's, for as long as it likes), and on SIGTERM waits for
every running request to finish. Here a connection whose headers are not in within
`header_timeout` seconds (of opening, or of the last response) is closed, and
`shutdown_timeout` seconds after SIGTERM the requests still running end with an error (a
503, or an error event in a stream), so the process exits. The body's deadline is the
app's (routes.read_json), where a 408 can still be answered.
"""

from __future__ import annotations

import asyncio
import functools

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

SHUTDOWN_MESSAGE = "the server is shutting down"
BACKSTOP_S = 5.0  # then uvicorn cancels what is left (upstream relays): they have no engine job


class HeaderTimeoutProtocol(H11Protocol):
    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout, self.header_timer = header_timeout, None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.arm()

    def connection_lost(self, exc) -> None:
        self.disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a request's headers are in
            self.disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.arm()

    def arm(self) -> None:
        self.disarm()
        self.header_timer = self.loop.call_later(self.header_timeout, self.headers_late)

    def disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def headers_late(self) -> None:
        self.header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """On shutdown, fails the engine's requests still running after `shutdown_timeout` s."""

    def __init__(self, config: uvicorn.Config, worker, shutdown_timeout: float):
        super().__init__(config)
        self.worker, self.shutdown_timeout = worker, shutdown_timeout

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.call_later(self.shutdown_timeout, self.worker.fail_all, SHUTDOWN_MESSAGE, 503)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()


def build_server(app, host: str, port: int, log_level: str = "info") -> DrainingServer:
    """uvicorn for `app` (create_app's), with its Settings' header and shutdown timeouts."""
    settings = app.state.settings
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            http=functools.partial(HeaderTimeoutProtocol, header_timeout=settings.header_timeout),
                            timeout_graceful_shutdown=settings.shutdown_timeout + BACKSTOP_S)
    return DrainingServer(config, app.state.worker, settings.shutdown_timeout)
