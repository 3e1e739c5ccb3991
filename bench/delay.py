"""A TCP proxy that delays every byte by half a round trip each way, as a remote server's
network would: `python3 delay.py LISTEN_PORT TARGET_HOST:PORT RTT_MS`. Bandwidth is not
limited; order within a connection is kept."""

import asyncio
import socket
import sys
import time


async def pipe(reader, writer, delay):
    queue = asyncio.Queue()

    async def send():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(1 << 20):
            queue.put_nowait((time.monotonic() + delay, data))
    except ConnectionError:
        pass
    queue.put_nowait((0, None))
    try:
        await sender
    except ConnectionError:
        pass


async def serve(port, host, target_port, delay):
    async def handle(reader, writer):
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, target_port)
        except OSError:
            writer.close()
            return
        up_writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(pipe(reader, up_writer, delay), pipe(up_reader, writer, delay))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def main():
    port, target, rtt = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    host, target_port = target.rsplit(":", 1)
    asyncio.run(serve(port, host, int(target_port), rtt / 2000))


if __name__ == "__main__":
    main()
