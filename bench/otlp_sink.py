"""A trace collector that accepts and drops everything: Arbiter's OTLP exporter posts here in the bench.

It answers every POST with an empty 200 (what an OTLP/HTTP collector answers to a successful export),
so the traced target pays for building, batching and exporting its spans, and nothing else.
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # readiness: the harness waits for a 200
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    ThreadingHTTPServer((host, port), _Sink).serve_forever()


if __name__ == "__main__":
    main()
