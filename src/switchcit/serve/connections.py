"""Time limits on HTTP connections: uvicorn's settings, plus a deadline for a request's headers.

Uvicorn closes an idle keep-alive connection only after a first answer, and restarts that clock on
every byte it receives, so a client that opens connections and sends its headers a byte at a time
(slowloris) holds them forever. Its h11 protocol is subclassed here to close a connection whose request
headers are not complete within --header-timeout of its opening or of its previous answer. What is
left to a reverse proxy is in the README (Operations and safety).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI


def uvicorn_config(app: FastAPI, **settings: Any) -> uvicorn.Config:
    """Uvicorn's config for an app made by `create_app`, with its connection limits (its ServeConfig)."""
    import uvicorn

    config = app.state.config
    protocol = functools.partial(_header_deadline_protocol(), header_timeout=config.header_timeout_s)
    return uvicorn.Config(app, http=protocol, timeout_keep_alive=config.keep_alive_s, **settings)


@functools.cache
def _header_deadline_protocol() -> type:
    """The h11 protocol with a header deadline (made on first use: uvicorn is imported only when serving)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        def __init__(self, *args: Any, header_timeout: float, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.header_timeout = header_timeout
            self._deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a request's headers are complete
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE:  # waiting for the next request (none pipelined)
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(self.header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline
