"""An origin server outside the mesh, for the egress tests.

Answers every request with "<method> <path> host=<Host header>
sni=<server name the TLS client sent, or ->" and status 200.
Usage: origin.py PORT [CERT KEY [CLIENT_CA]]: with a certificate and key it
speaks TLS only (a plaintext request fails the handshake); with CLIENT_CA
too, only to clients presenting a certificate that CA signed.
"""
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sni_seen = {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        sni = getattr(self.connection, "sni", None) or "-"
        body = f"{self.command} {self.path} host={self.headers.get('host')} sni={sni}\n".encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    ctx = None

    def get_request(self):
        sock, addr = super().get_request()
        if self.ctx is None:
            return sock, addr
        names = []
        self.ctx.sni_callback = lambda s, name, c: names.append(name)
        tls = self.ctx.wrap_socket(sock, server_side=True)
        tls.sni = names[0] if names else None
        return tls, addr


def main():
    srv = Server(("0.0.0.0", int(sys.argv[1])), Handler)
    if len(sys.argv) > 3:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[2], sys.argv[3])
        if len(sys.argv) > 4:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(sys.argv[4])
        srv.ctx = ctx
    srv.serve_forever()


if __name__ == "__main__":
    main()
