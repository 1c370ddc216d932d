"""A fault-injecting S3 proxy on 127.0.0.1: between ckptd and a real S3 server, driven by a schedule.

It relays HTTP/1.1 byte for byte (the client signs for the proxy's Host, which is forwarded
unchanged, so even a server that checks signatures accepts it) and parses just enough of each
request (request line, headers, Content-Length or chunked bodies) to give it a name (`PutObject`,
`UploadPart`, `GetObject`, ...) and to apply the first `Rule` that matches it. A rule matches on
operation, key glob, the nth matching request, a probability from the proxy's seeded RNG and a time
window; its fault is one of:

    error500       500 InternalError, an S3 XML body (the request body is read first)
    slowdown503    503 SlowDown, an S3 XML body
    reset_request  part of the request body reaches the server, then both sides are reset (RST)
    reset_response the server answers, part of the answer reaches the client, then RST
    stall          the server answers, the client gets nothing for `seconds`, then RST
    outage         the port refuses connections for `seconds`, open connections are reset
    truncate       a body shorter than its Content-Length, then a clean close
    bad_etag       the ETag header of the answer is replaced by another, well-formed one

`injected` counts faults by kind; `log` records every request (operation, key, part, body bytes
the client sent, status), which is how the trial runner measures bytes re-sent after a crash.
Expect: 100-continue is answered by the proxy itself and not forwarded (it is not signed).
"""

from __future__ import annotations

import collections
import fnmatch
import hashlib
import math
import random
import socket
import threading
import time
from dataclasses import dataclass, field

from reliability.wire import CHUNK, Conn, Cut, Message, Wire, body_framing, consume, hold, operation, pieces, reset

KINDS = ("error500", "slowdown503", "reset_request", "reset_response", "stall", "outage", "truncate", "bad_etag")
_ERRORS = {"error500": (500, "InternalError", "We encountered an internal error."),
           "slowdown503": (503, "SlowDown", "Please reduce your request rate.")}  # fmt: skip


@dataclass
class Rule:
    """One line of the schedule. Counters (`seen`, `fired`) are the proxy's, per rule."""

    fault: str
    ops: tuple[str, ...] = ()  # S3 operation names; empty: any
    key: str = "*"  # glob on the object key (without the bucket)
    nth: tuple[int, ...] = ()  # 1-based positions among the requests this rule matches; empty: any
    probability: float = 1.0
    start: float = 0.0  # window, seconds after the schedule was set
    stop: float = math.inf
    times: int | None = None  # at most this many injections
    fraction: float = 0.5  # reset/truncate: share of the body that passes before the cut
    seconds: float = 0.0  # stall hold, outage length
    seen: int = field(default=0, compare=False)
    fired: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.fault not in KINDS:
            raise ValueError(f"unknown fault {self.fault!r}; one of {', '.join(KINDS)}")

    def wants(self, op: str, key: str, elapsed: float, rng: random.Random) -> bool:
        if (self.ops and op not in self.ops) or not fnmatch.fnmatchcase(key, self.key):
            return False
        if not self.start <= elapsed < self.stop or (self.times is not None and self.fired >= self.times):
            return False
        self.seen += 1
        if self.nth and self.seen not in self.nth:
            return False
        return rng.random() < self.probability


@dataclass
class Request:
    op: str
    key: str
    query: dict[str, str]
    sent: int = 0  # body bytes the client sent through the proxy
    status: int | None = None  # None: no answer reached the client
    fault: str | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None


class FaultProxy:
    def __init__(self, target_port: int, rules: list[Rule] | None = None, seed: int = 0) -> None:
        self.target = ("127.0.0.1", target_port)
        self.rng = random.Random(seed)
        self.injected: collections.Counter[str] = collections.Counter()
        self.log: list[Request] = []
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._closed = threading.Event()
        self._listener: socket.socket | None = None
        self._down_until = 0.0
        self.port = 0
        self.schedule(rules or [])
        self._listen()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def schedule(self, rules: list[Rule]) -> None:
        with self._lock:
            self.rules, self._t0 = list(rules), time.monotonic()

    def outage(self, seconds: float) -> None:
        """Refuse connections for `seconds` (from now) and reset every open one."""
        with self._lock:
            self.injected["outage"] += 1
        self._down(seconds)

    def _down(self, seconds: float) -> None:
        with self._lock:
            self._down_until = time.monotonic() + seconds
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        self._shut(listener, conns)
        timer = threading.Timer(seconds, self._listen)
        timer.daemon = True
        timer.start()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        self._shut(listener, conns)

    @staticmethod
    def _shut(listener: socket.socket | None, conns: set[socket.socket]) -> None:
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            except OSError:
                pass
            listener.close()
        for conn in conns:
            reset(conn)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def requests(self, *ops: str) -> list[Request]:
        with self._lock:
            return [r for r in self.log if not ops or r.op in ops]

    # -- connections --------------------------------------------------------------------------

    def _listen(self) -> None:
        if self._closed.is_set() or self._listener is not None or time.monotonic() < self._down_until - 0.01:
            return  # closed, already listening, or a longer outage began meanwhile
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                if self._listener is not listener:
                    reset(client)
                    return
                self._conns.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        conn = Conn(Wire(client))
        try:
            while self._exchange(conn):
                pass
        except (Cut, OSError, ValueError):
            pass  # the client left, a fault cut the connection, or an outage closed it
        finally:
            with self._lock:
                self._conns.discard(client)
            conn.close()

    def _choose(self, op: str, key: str) -> Rule | None:
        with self._lock:
            elapsed = time.monotonic() - self._t0
            rule = next((r for r in self.rules if r.wants(op, key, elapsed, self.rng)), None)
            if rule:
                rule.fired += 1
                self.injected[rule.fault] += 1
            return rule

    def _exchange(self, conn: Conn) -> bool:
        """One request and its answer; False when the connection is done."""
        req = Message.read(conn.client)
        if req is None:
            return False
        method, target = req.start.split(" ")[:2]
        op, key, query = operation(method, target)
        entry = Request(op, key, query)
        with self._lock:
            self.log.append(entry)
        if req.header("expect").lower() == "100-continue":
            conn.client.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            req.drop("expect")
        rule = self._choose(op, key)
        fault = entry.fault = rule.fault if rule else None
        framing = body_framing(req, response=False)
        if rule and fault == "outage":
            self._down(rule.seconds)
            return False
        if fault in _ERRORS:
            entry.sent = sum(len(p) for p in pieces(conn.client, framing))
            conn.client.sock.sendall(_error(fault, key, len(self.log)))
            entry.status, entry.ended = _ERRORS[fault][0], time.monotonic()
            return True
        up = conn.upstream(self.target)
        up.sock.sendall(req.raw())
        budget = None
        if rule and fault == "reset_request":
            budget = int((framing[1] if framing[0] == "length" else CHUNK) * rule.fraction)
        for piece in pieces(conn.client, framing):
            if budget is not None and entry.sent + len(piece) > budget:
                up.sock.sendall(piece[: budget - entry.sent])
                entry.sent = budget
                return False  # conn.close() resets both sides
            up.sock.sendall(piece)
            entry.sent += len(piece)
        return self._respond(conn, method, rule, entry, req)

    def _respond(self, conn: Conn, method: str, rule: Rule | None, entry: Request, req: Message) -> bool:
        up, client = conn.up, conn.client
        assert up is not None
        resp = Message.read(up)
        if resp is None:
            raise Cut("the server closed the connection")
        entry.status = int(resp.start.split(" ")[1])
        framing = body_framing(resp, response=True, head=method == "HEAD")
        fault = rule.fault if rule else None
        if rule and fault == "stall":
            entry.status = None
            consume(up, framing)
            hold(client.sock, rule.seconds, self._closed)
            return False
        if fault == "bad_etag" and resp.header("etag"):
            resp.set("etag", '"' + hashlib.md5(resp.header("etag").encode()).hexdigest() + '"')
        head = resp.raw()
        if rule and fault in ("reset_response", "truncate"):
            conn.graceful = _cut(client, up, head, framing, rule, entry)
            return False
        client.sock.sendall(head)
        for piece in pieces(up, framing):
            client.sock.sendall(piece)
        entry.ended = time.monotonic()
        closing = "close" in (resp.header("connection") + req.header("connection")).lower()
        if framing[0] == "eof" or closing:
            conn.graceful = True
            return False
        return True


def _cut(client: Wire, up: Wire, head: bytes, framing: tuple, rule: Rule, entry: Request) -> bool:
    """truncate: the head and part of the body, then a clean close (FIN); reset_response: part of
    the answer, then RST. An answer with no body is cut inside its head. True for a clean close."""
    size = framing[1] if framing[0] == "length" else 0
    if rule.fault == "truncate" and size:
        client.sock.sendall(head)
        budget, passed = int(size * rule.fraction), 0
        for piece in pieces(up, framing):
            take = piece[: max(0, budget - passed)]
            client.sock.sendall(take)
            passed += len(take)
            if passed >= budget:
                break
        return True
    entry.status = None
    body = b"".join(pieces(up, framing)) if size <= CHUNK else b""
    whole = head + body
    client.sock.sendall(whole[: int(len(whole) * rule.fraction)])
    return False


def _error(fault: str, key: str, request_id: int) -> bytes:
    status, code, message = _ERRORS[fault]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>/{key}</Resource>"
        f"<RequestId>ckptd-faults-{request_id}</RequestId></Error>"
    ).encode()
    reason = "Internal Server Error" if status == 500 else "Service Unavailable"
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
        f"x-amz-request-id: ckptd-faults-{request_id}\r\n\r\n"
    ).encode() + body
