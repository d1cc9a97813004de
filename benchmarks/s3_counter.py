"""A counting HTTP proxy in front of SeaweedFS's S3 port: S3 requests by type, for bench_jobs.

Every process of a benchmarked cluster is given this proxy's address as its S3 endpoint, so every
request (signed or presigned) passes through it. It forwards bytes unchanged (a SigV4 signature
covers the Host header the client sent, which is the proxy's, and that header reaches SeaweedFS
as sent), reads only each request's head to classify it and its body length to find the next one,
and pipes the responses back untouched. It runs as its own process so that its CPU is not the
client's; `GET /__counts__` answers the counts as JSON instead of forwarding.

    python benchmarks/s3_counter.py UPSTREAM_PORT LISTEN_PORT
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from urllib.parse import parse_qs, urlsplit

KINDS = ("GET", "LIST", "conditional PUT", "PUT", "HEAD", "DELETE", "presigned", "other")
COUNTS_PATH = "/__counts__"


def classify(method: str, target: str, headers: dict[str, str]) -> str:
    """One of KINDS for a request line and its (lower-cased) headers."""
    url = urlsplit(target)
    query = parse_qs(url.query, keep_blank_values=True)
    object_key = url.path.strip("/").partition("/")[2]
    if "X-Amz-Signature" in query or (
        method == "POST" and headers.get("content-type", "").startswith("multipart/form-data")
    ):
        return "presigned"  # a presigned URL (GET/PUT) or a POST-policy upload: a PAR transfer
    if method == "GET":
        return "GET" if object_key and "list-type" not in query else "LIST"
    if method == "PUT":
        return "conditional PUT" if {"if-none-match", "if-match"} & headers.keys() else "PUT"
    if method == "HEAD":
        return "HEAD"
    if method == "DELETE" or (method == "POST" and "delete" in query):
        return "DELETE"
    return "other"


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """The request body as sent (chunked bodies with their framing)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        framed = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            framed += size_line
            size = int(size_line.split(b";")[0], 16)
            framed += await reader.readexactly(size + 2)
            if size == 0:
                return framed  # (no trailers from the clients measured here)
    return await reader.readexactly(int(headers.get("content-length", "0")))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class CountingProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.counts = Counter[str]()

    async def serve(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        responses: asyncio.Task[None] | None = None
        try:
            while head := await client_in.readuntil(b"\r\n\r\n"):
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers = {}
                for line in filter(None, lines):
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                if target == COUNTS_PATH:
                    body = json.dumps(self.counts).encode()
                    client_out.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                    client_out.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    await client_out.drain()
                    continue
                self.counts[classify(method, target, headers)] += 1
                if upstream is None:
                    upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
                    responses = asyncio.create_task(_pipe(upstream[0], client_out))
                upstream[1].write(head)
                if headers.get("expect", "").lower() == "100-continue":
                    await upstream[1].drain()  # the 100 goes back through `responses`
                upstream[1].write(await _read_body(client_in, headers))
                await upstream[1].drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if upstream is not None:
                upstream[1].close()
            if responses is not None:
                await asyncio.gather(responses, return_exceptions=True)
            client_out.close()


async def main(upstream_port: int, listen_port: int) -> None:
    proxy = CountingProxy(upstream_port)
    server = await asyncio.start_server(proxy.serve, "127.0.0.1", listen_port, limit=2**20)
    async with server:
        print("ready", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
