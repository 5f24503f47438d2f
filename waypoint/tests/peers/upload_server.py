"""HTTP/1.1 upload sink for the waypoint's streaming tests.

Every request's body is read in 64 KiB pieces (never whole) and answered
with its length and SHA-256: "<len> <hex>\n". A path under /flaky/ answers
503 the first time per path, after reading the body, so a retry has to send
the body again. GET /seen lists every request answered: "<path> <len> <hex>"
per line; GET /file/<absolute path> streams that file back.
Usage: upload_server.py PORT
"""
import hashlib
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

seen = set()
answered = []
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def body(self):
        h, n = hashlib.sha256(), 0
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    piece = self.rfile.read(min(left, 65536))
                    if not piece:
                        raise ConnectionError("body cut short")
                    h.update(piece)
                    left -= len(piece)
                n += size
                self.rfile.readline()
        else:
            left = int(self.headers.get("content-length", "0"))
            while left:
                piece = self.rfile.read(min(left, 65536))
                if not piece:
                    raise ConnectionError("body cut short")
                h.update(piece)
                n += len(piece)
                left -= len(piece)
        return n, h.hexdigest()

    def answer(self):
        if self.path == "/seen":
            with lock:
                text = "".join(f"{p} {n} {d}\n" for p, n, d in answered).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)
            return
        if self.path.startswith("/file/"):
            name = self.path[len("/file"):]
            with open(name, "rb") as f:
                self.send_response(200)
                self.send_header("content-length", str(os.path.getsize(name)))
                self.end_headers()
                while piece := f.read(65536):
                    self.wfile.write(piece)
            return
        n, digest = self.body()
        code = 200
        if self.path.startswith("/flaky/"):
            with lock:
                if self.path not in seen:
                    seen.add(self.path)
                    code = 503
        with lock:
            answered.append((self.path, n, digest))
        text = f"{n} {digest}\n".encode()
        self.send_response(code)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    do_POST = do_PUT = do_GET = answer


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
