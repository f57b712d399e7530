"""The example agent: POST any JSON, get {"greeting": ..., "echo": <your JSON>} back."""

import json
import os
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def _answer(self, payload):
        body = json.dumps({"greeting": os.environ.get("GREETING", "hello"), "echo": payload}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._answer(None)

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            payload = json.loads(raw or b"null")
        except ValueError:
            payload = raw.decode(errors="replace")
        self._answer(payload)


if __name__ == "__main__":
    HTTPServer(("", 8000), Handler).serve_forever()
