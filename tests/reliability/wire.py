"""Just enough HTTP/1.1 for the fault proxy (tests/faults.py): messages, body framing, S3 operation
names, and the proxy's connections (kept alive, reset with RST, held without an answer).

Bodies are relayed as raw pieces (chunked framing included), so what reaches the server is exactly
what the client sent.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

CHUNK = 1 << 16
MAX_HEAD = 1 << 20


class Cut(Exception):
    """The connection ended (or was ended on purpose) in the middle of an exchange."""


class Wire:
    """A socket with a read buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(CHUNK)
        self.buf += data
        return bool(data)

    def until(self, mark: bytes, limit: int = MAX_HEAD) -> bytes | None:
        """Bytes up to and including `mark`; None at a clean end before any byte."""
        while (end := self.buf.find(mark)) < 0:
            if len(self.buf) > limit:
                raise ValueError("header too long")
            if not self._fill():
                if self.buf:
                    raise Cut("ended inside a header")
                return None
        data = bytes(self.buf[: end + len(mark)])
        del self.buf[: end + len(mark)]
        return data

    def take(self, n: int, eof_ok: bool = False) -> bytes:
        """Between 1 and `n` bytes; b"" only at the end of the stream when `eof_ok`."""
        if not self.buf and not self._fill():
            if eof_ok:
                return b""
            raise Cut("ended inside a body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data


@dataclass
class Message:
    start: str
    headers: list[tuple[str, str]]

    @classmethod
    def read(cls, wire: Wire) -> Message | None:
        raw = wire.until(b"\r\n\r\n")
        if raw is None:
            return None
        start, *lines = raw[:-4].decode("latin-1").split("\r\n")
        headers = [(name, value.strip()) for name, _, value in (line.partition(":") for line in lines)]
        return cls(start, headers)

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k.lower() == name), "")

    def drop(self, name: str) -> None:
        self.headers = [(k, v) for k, v in self.headers if k.lower() != name]

    def set(self, name: str, value: str) -> None:
        self.headers = [(k, value if k.lower() == name else v) for k, v in self.headers]

    def raw(self) -> bytes:
        return ("\r\n".join([self.start, *(f"{k}: {v}" for k, v in self.headers)]) + "\r\n\r\n").encode("latin-1")


def body_framing(msg: Message, response: bool, head: bool = False) -> tuple[str, int | None]:
    """How the body of `msg` ends: ("length", n), ("chunked", None) or ("eof", None).

    | message                              | framing            |
    |--------------------------------------|--------------------|
    | answer to HEAD, or status 1xx/204/304 | ("length", 0)     |
    | Transfer-Encoding: chunked           | ("chunked", None)  |
    | Content-Length: n                    | ("length", n)      |
    | a request with neither               | ("length", 0)      |
    | an answer with neither               | ("eof", None)      |
    """
    if response:
        status = int(msg.start.split(" ")[1])
        if head or status < 200 or status in (204, 304):
            return ("length", 0)
    if "chunked" in msg.header("transfer-encoding").lower():
        return ("chunked", None)
    if msg.header("content-length"):
        return ("length", int(msg.header("content-length")))
    return ("eof", None) if response else ("length", 0)


def pieces(wire: Wire, framing: tuple[str, int | None]) -> Iterator[bytes]:
    """The raw bytes of a body, as they arrive."""
    kind, size = framing
    if kind == "length":
        left = size or 0
        while left:
            data = wire.take(min(left, CHUNK))
            left -= len(data)
            yield data
    elif kind == "eof":
        while data := wire.take(CHUNK, eof_ok=True):
            yield data
    else:
        while True:
            line = wire.until(b"\r\n", 4096)
            if line is None:
                raise Cut("ended inside a chunked body")
            yield line
            length = int(line.split(b";")[0], 16)
            if length == 0:
                break
            yield from pieces(wire, ("length", length + 2))  # the data and its CRLF
        while (trailer := wire.until(b"\r\n", 4096)) not in (b"\r\n", None):
            yield trailer
        yield b"\r\n"


_BY_QUERY = {  # (method, names a key): [(query parameter, operation)], first match wins, then the default
    ("PUT", True): ([("partNumber", "UploadPart")], "PutObject"),
    ("PUT", False): ([], "CreateBucket"),
    ("POST", True): ([("uploads", "CreateMultipartUpload"), ("uploadId", "CompleteMultipartUpload")], "PostObject"),
    ("POST", False): ([("delete", "DeleteObjects")], "PostBucket"),
    ("GET", True): ([("uploadId", "ListParts")], "GetObject"),
    ("GET", False): ([("uploads", "ListMultipartUploads"), ("location", "GetBucketLocation")], "ListObjects"),
    ("HEAD", True): ([], "HeadObject"),
    ("HEAD", False): ([], "HeadBucket"),
    ("DELETE", True): ([("uploadId", "AbortMultipartUpload")], "DeleteObject"),
    ("DELETE", False): ([], "DeleteBucket"),
}


def operation(method: str, target: str) -> tuple[str, str, dict[str, str]]:
    """(S3 operation, object key, query) of a path-style request `METHOD /bucket/key?query`.

    | method | key? | query parameter | operation                                  |
    |--------|------|-----------------|--------------------------------------------|
    | PUT    | yes  | partNumber      | UploadPart                                 |
    | PUT    | yes  | -               | PutObject                                  |
    | POST   | yes  | uploads         | CreateMultipartUpload                      |
    | POST   | yes  | uploadId        | CompleteMultipartUpload                    |
    | POST   | no   | delete          | DeleteObjects                              |
    | GET    | yes  | uploadId        | ListParts                                  |
    | GET    | yes  | -               | GetObject                                  |
    | GET    | no   | uploads         | ListMultipartUploads                       |
    | GET    | no   | -               | ListObjects (v1 and v2)                    |
    | HEAD   | yes  | -               | HeadObject                                 |
    | DELETE | yes  | uploadId        | AbortMultipartUpload                       |
    | other  |      |                 | METHOD + "Other"                           |
    """
    parts = urlsplit(target)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    _bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
    entry = _BY_QUERY.get((method, bool(key)))
    if entry is None:
        return method.title() + "Other", key, query
    by_param, default = entry
    return next((op for param, op in by_param if param in query), default), key, query


class Conn:
    """A client connection and the server connection its requests go to (opened on demand)."""

    def __init__(self, client: Wire) -> None:
        self.client = client
        self.up: Wire | None = None
        self.graceful = False

    def upstream(self, target: tuple[str, int]) -> Wire:
        if self.up is not None and readable(self.up.sock):  # the server closed an idle connection
            self.up.sock.close()
            self.up = None
        if self.up is None:
            self.up = Wire(socket.create_connection(target))
        return self.up

    def close(self) -> None:
        # Anything but a completed exchange ends in RST on both sides: a fault, or a broken peer.
        end = (lambda s: s.close()) if self.graceful else reset
        end(self.client.sock)
        if self.up is not None:
            end(self.up.sock)


def hold(sock: socket.socket, seconds: float, closed: threading.Event) -> None:
    """Answer nothing for `seconds`, unless the client gives up first or the proxy closes."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and not closed.is_set():
        if select.select([sock], [], [], min(left, 0.2))[0] and not sock.recv(CHUNK):
            return


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def consume(wire: Wire, framing: tuple) -> None:
    for _ in pieces(wire, framing):
        pass


def reset(sock: socket.socket) -> None:
    """Close with RST, not FIN: the peer sees 'connection reset by peer'. SHUT_RD sends nothing but
    wakes a thread blocked reading this socket (an outage closes other threads' connections)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()
