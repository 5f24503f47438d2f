"""WebSocket echo server (the `websockets` library). Usage: ws_echo.py PORT"""
import asyncio
import sys

from websockets.asyncio.server import serve


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def main():
    async with serve(echo, "0.0.0.0", int(sys.argv[1]), max_size=None):
        await asyncio.get_running_loop().create_future()


asyncio.run(main())
