"""A real HTTP server standing in for a Discord webhook: it decodes each multipart POST (payload_json + files[0])
and keeps what it got; `statuses` scripts its answers (the last one repeats), `delay` makes it slow, `retry_after`
is the Retry-After header of its failures."""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


@dataclass
class Received:
    path: str
    payload: dict
    filename: str
    image: np.ndarray  # (H, W, 3) uint8, decoded from the PNG
    png: bytes  # the file as it arrived


@dataclass
class WebhookServer:
    statuses: list[int] = field(default_factory=lambda: [204])
    delay: float = 0.0
    retry_after: str | None = None
    received: list[Received] = field(default_factory=list)
    requests: int = 0
    errors: list[str] = field(default_factory=list)

    def __enter__(self) -> WebhookServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                server.requests += 1
                status = server.statuses[min(server.requests - 1, len(server.statuses) - 1)]
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if server.delay:
                    time.sleep(server.delay)
                if status < 300:
                    try:
                        server.received.append(decode(self.path, self.headers["Content-Type"], body))
                    except Exception as e:  # noqa: BLE001 - the test reads the errors
                        server.errors.append(repr(e))
                        status = 400
                self.send_response(status)
                if status >= 300 and server.retry_after is not None:
                    self.send_header("Retry-After", server.retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str = "/api/webhooks/1234/s3cr3t-T0KEN-value") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


def decode(path: str, content_type: str, body: bytes) -> Received:
    """The multipart body as a Discord webhook reads it: payload_json must be JSON, files[0] a PNG."""
    assert content_type.startswith("multipart/form-data; boundary="), content_type
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts = {p.get_param("name", header="content-disposition"): p for p in message.iter_parts()}
    assert set(parts) == {"payload_json", "files[0]"}, set(parts)
    assert parts["files[0]"].get_content_type() == "image/png"
    payload = json.loads(parts["payload_json"].get_payload(decode=True))
    png = parts["files[0]"].get_payload(decode=True)
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG"
        image = np.asarray(im.convert("RGB"))
    return Received(path, payload, parts["files[0]"].get_filename(), image, png)
