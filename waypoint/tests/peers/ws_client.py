"""WebSocket client: sends N messages of growing size (text and binary
alternately), each checked against its echo before the next goes.
An optional PAUSE (seconds) idles the connection halfway through; an
optional HOLD (seconds) then keeps exchanging a message every 100 ms and
reports whether the connection was closed on it.
Prints "echoed N" (then "held" or "closed"), or "status <code>" when the
handshake is refused. Usage: ws_client.py URL N [PAUSE [HOLD]]"""
import asyncio
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


async def main(url, n, pause, hold):
    try:
        async with connect(url, max_size=None, open_timeout=10) as ws:
            for i in range(n):
                if i == n // 2:
                    await asyncio.sleep(pause)
                msg = ("m%d-" % i) * (1 + i * 37 % 2000)
                if i % 2:
                    msg = msg.encode()
                await ws.send(msg)
                got = await asyncio.wait_for(ws.recv(), 10)
                if got != msg:
                    print(f"mismatch at {i}")
                    return
            print(f"echoed {n}", flush=True)
            if hold:
                end = asyncio.get_running_loop().time() + hold
                try:
                    while asyncio.get_running_loop().time() < end:
                        await ws.send("ping")
                        await asyncio.wait_for(ws.recv(), 5)
                        await asyncio.sleep(0.1)
                    print("held")
                except (ConnectionClosed, asyncio.TimeoutError):
                    print("closed")
    except InvalidStatus as e:
        print(f"status {e.response.status_code}")


args = sys.argv[1:] + ["0", "0"]
asyncio.run(main(args[0], int(args[1]), float(args[2]), float(args[3])))
