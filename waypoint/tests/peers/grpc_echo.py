"""gRPC peer (grpcio, raw bytes, no generated code).

server PORT: /echo.Echo/Chat is bidi: each message is answered at once
with "echo:" + it, and the call ends with trailing metadata x-trailer: yes;
/echo.Echo/Fail is unary and fails with NOT_FOUND; /echo.Echo/Slow answers
after 3 s; /echo.Echo/Flaky is unary and fails with UNAVAILABLE on every
odd-numbered call (1st, 3rd, ...), answering "ok" on the others.
client ADDR N: Chat sends message i only after reply i-1 arrived (a proxy
that buffered the request stream would stall it), checks the trailer, then
calls Fail. Prints "chat N trailer=yes", then "fail <CODE>".
flaky ADDR: one call to Flaky; prints "flaky ok" or "flaky <CODE>".
"""
import threading
import queue
import sys
import time
from concurrent import futures

import grpc

OPTS = [("grpc.enable_http_proxy", 0)]


def serve(port):
    def chat(requests, context):
        context.set_trailing_metadata((("x-trailer", "yes"),))
        for r in requests:
            yield b"echo:" + r

    def fail(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    def slow(request, context):
        time.sleep(3)
        return b"slow"

    calls = [0]
    lock = threading.Lock()

    def flaky(request, context):
        with lock:
            calls[0] += 1
            n = calls[0]
        if n % 2 == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return b"ok"

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
            "Flaky": grpc.unary_unary_rpc_method_handler(flaky),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTS)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    server.wait_for_termination()


def client(addr, n):
    ch = grpc.insecure_channel(addr, options=OPTS)
    grpc.channel_ready_future(ch).result(timeout=10)
    chat = ch.stream_stream("/echo.Echo/Chat")
    outbox = queue.Queue()

    def requests():
        while True:
            m = outbox.get()
            if m is None:
                return
            yield m

    outbox.put(b"0")
    call = chat(requests(), timeout=30)
    got = 0
    for reply in call:
        if reply != b"echo:%d" % got:
            print(f"mismatch at {got}: {reply!r}")
            return
        got += 1
        outbox.put(b"%d" % got if got < n else None)
    trailer = dict(call.trailing_metadata() or ()).get("x-trailer")
    print(f"chat {got} trailer={trailer}")
    try:
        ch.unary_unary("/echo.Echo/Fail")(b"x", timeout=10)
        print("fail OK")
    except grpc.RpcError as e:
        print(f"fail {e.code().name}")


def flaky_client(addr):
    ch = grpc.insecure_channel(addr, options=OPTS)
    try:
        reply = ch.unary_unary("/echo.Echo/Flaky")(b"x", timeout=10)
        print(f"flaky {reply.decode()}")
    except grpc.RpcError as e:
        print(f"flaky {e.code().name}")


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]))
    elif sys.argv[1] == "flaky":
        flaky_client(sys.argv[2])
    else:
        client(sys.argv[2], int(sys.argv[3]))
