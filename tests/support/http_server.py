"""A real HTTP file server on 127.0.0.1 for download tests, with switches to misbehave on purpose.

with serve_directory(root) as server:
    server.cut_after = 1000  # the next response stops after 1000 body bytes
    download(server.url("a.tgz"))
    assert server.requests == 1
"""

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlparse


@dataclass
class FileServer:
    """State and switches of a running server; tests read and set these attributes directly.

    Attributes:
        root: Folder the files are served from.
        port: Port the server listens on.
        cut_after: Close the connection after this many body bytes (the full Content-Length is still sent).
        cut_every_request: Cut every response; by default only the next one, then cut_after is cleared.
        ignore_range: Answer 200 with the whole file even when the request has a Range header.
        force_status: Answer every request with this status and an empty body (e.g. 503).
        delay_seconds: Wait this long before answering each request (to make concurrent clients overlap).
        requests: Number of requests received.
        range_headers: The Range header of each request, in order (None where there was none).
    """

    root: Path
    port: int = 0
    cut_after: int | None = None
    cut_every_request: bool = False
    ignore_range: bool = False
    force_status: int | None = None
    delay_seconds: float = 0.0
    requests: int = 0
    range_headers: list[str | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def url(self, name: str) -> str:
        """Return the URL of a file under root."""
        return f"http://127.0.0.1:{self.port}/{quote(name)}"

    def record(self, range_header: str | None) -> int | None:
        """Count a request and return the cut-off to apply to its response, if any."""
        with self.lock:
            self.requests += 1
            self.range_headers.append(range_header)
            cut_after = self.cut_after
            if not self.cut_every_request:
                self.cut_after = None
            return cut_after


def _handler_for(server: FileServer) -> type[BaseHTTPRequestHandler]:
    """Build a request handler class bound to one server's state."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive and Content-Length framing, as real servers do

        def do_GET(self) -> None:  # the name http.server dispatches GET to
            cut_after = server.record(self.headers.get("Range"))
            time.sleep(server.delay_seconds)
            if server.force_status is not None:
                self._send_empty(server.force_status)
                return
            path = server.root / unquote(urlparse(self.path).path).lstrip("/")
            if not path.is_file():
                self._send_empty(HTTPStatus.NOT_FOUND)
                return
            self._send_file(path.read_bytes(), cut_after)

        def _send_file(self, data: bytes, cut_after: int | None) -> None:
            start = None if server.ignore_range else _range_start(self.headers.get("Range"))
            if start is not None and start >= len(data):
                self._send_empty(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"Content-Range": f"bytes */{len(data)}"})
                return
            body = data[start or 0 :]
            self.send_response(HTTPStatus.OK if start is None else HTTPStatus.PARTIAL_CONTENT)
            if start is not None:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if cut_after is not None:
                body = body[:cut_after]
                self.close_connection = True  # the client sees the socket close before Content-Length bytes
            self.wfile.write(body)

        def _send_empty(self, status: int, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # the base class names it format
            """Keep test output quiet."""

    return Handler


def _range_start(header: str | None) -> int | None:
    """Return N from `bytes=N-`, or None when there is no Range header this server understands."""
    if header is None or not header.startswith("bytes=") or not header.endswith("-"):
        return None
    value = header.removeprefix("bytes=").removesuffix("-")
    return int(value) if value.isdigit() else None


@contextlib.contextmanager
def serve_directory(root: Path) -> Iterator[FileServer]:
    """Serve the files under root on 127.0.0.1 from a daemon thread; shut down and close the socket after."""
    state = FileServer(root=Path(root))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    # A short poll interval: shutdown() waits for the serving loop to notice, 0.5 s by default.
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="test-http-server", daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """Yield a 127.0.0.1 port that refuses connections: bound (so nobody else takes it) but not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """Yield a 127.0.0.1 port that accepts connections but never answers, to provoke read timeouts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)  # the kernel completes the handshake; nobody ever reads the request
        yield sock.getsockname()[1]
