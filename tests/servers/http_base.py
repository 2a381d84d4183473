"""The HTTP server class both test servers run on."""

from __future__ import annotations

import sys
from http.server import ThreadingHTTPServer

__all__ = ["QuietHTTPServer"]


class QuietHTTPServer(ThreadingHTTPServer):
    """Threaded, non-blocking shutdown; a client that hangs up (a kernel exiting) is not an error."""

    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)
