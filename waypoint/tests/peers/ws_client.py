"""WebSocket client: sends N messages of growing size (text and binary
alternately), each checked against its echo before the next goes.
An optional PAUSE (seconds) idles the connection halfway through.
Prints "echoed N" or "status <code>" when the handshake is refused.
Usage: ws_client.py URL N [PAUSE]"""
import asyncio
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus


async def main(url, n, pause):
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
            print(f"echoed {n}")
    except InvalidStatus as e:
        print(f"status {e.response.status_code}")


asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0))
