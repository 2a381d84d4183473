"""The HTTP server class both test servers run on."""

from __future__ import annotations

import socket
import sys
from http.server import ThreadingHTTPServer

__all__ = ["QuietHTTPServer"]


class QuietHTTPServer(ThreadingHTTPServer):
    """Threaded, non-blocking shutdown; a client that hangs up (a kernel exiting) is not an error."""

    daemon_threads = True
    block_on_close = False

    def get_request(self) -> tuple[socket.socket, object]:
        connection, address = super().get_request()
        # Headers and body go out in separate writes: without this, Nagle's algorithm meets the
        # client's delayed ACK and every keep-alive request waits ~40 ms.
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection, address

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)
