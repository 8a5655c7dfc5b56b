"""The web app of the preview tests: what a user runs in a sandbox, in the standard library
only. `python3 app.py PORT...` serves on 127.0.0.1 at each port:

  /            an HTML page ("hello from the sandbox", and the port)
  /headers     the request's headers as JSON
  /sse         Server-Sent Events: `one` at once, `two` once /tmp/release-sse exists
  /ws          a WebSocket that answers each text message with "echo: " + it
  /bytes/N     N zero bytes (a download)
"""

import base64
import hashlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_body(self, status, ctype, body):
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/sse":
            return self.sse()
        if path == "/ws":
            return self.ws()
        if path.startswith("/bytes/"):
            return self.zeros(int(path[len("/bytes/"):]))
        if path == "/headers":
            body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
            return self.send_body(200, "application/json", body)
        port = self.server.server_address[1]
        page = f"<!doctype html><title>app</title><h1>hello from the sandbox</h1><p>port {port}</p>"
        self.send_body(200, "text/html; charset=utf-8", page.encode())

    def sse(self):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def chunk(data):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        chunk(b"data: one\n\n")
        while not os.path.exists("/tmp/release-sse"):
            time.sleep(0.05)
        chunk(b"data: two\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def ws(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, n = head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = int.from_bytes(self.rfile.read(2), "big")
            elif n == 127:
                n = int.from_bytes(self.rfile.read(8), "big")
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                self.wfile.flush()
                return
            if opcode == 1:
                out = b"echo: " + data
                self.wfile.write(bytes([0x81, len(out)]) + out)
                self.wfile.flush()

    def zeros(self, n):
        self.send_response(200)
        self.send_header("content-type", "application/octet-stream")
        self.send_header("content-length", str(n))
        self.end_headers()
        block = bytes(1 << 20)
        while n > 0:
            k = min(n, len(block))
            self.wfile.write(block[:k])
            n -= k


def main():
    servers = [ThreadingHTTPServer(("127.0.0.1", int(p)), Handler) for p in sys.argv[1:]]
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
