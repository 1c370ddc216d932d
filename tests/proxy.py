"""A TCP proxy on 127.0.0.1 that a test can take down and bring back: a store outage, for real.

Down means the port refuses connections and open ones are cut, as when a store's endpoint dies.
`bytes_to_client` counts what the server sent back through the proxy: what a command downloaded.
"""

from __future__ import annotations

import selectors
import socket
import threading


class Proxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.bytes_to_client = 0  # server -> client, every connection, since the proxy was made
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stop.clear()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        self._stop.set()
        with self._lock:
            if self._listener:
                self._listener.close()
                self._listener = None
            for conn in self._conns:
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._stop.is_set():  # went down while this one was being connected
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        try:
            # down() may close both sockets at any moment, even before they are registered: a
            # closed socket shows as OSError from the calls, ValueError (fd -1) from the selector.
            sel.register(a, selectors.EVENT_READ, b)
            sel.register(b, selectors.EVENT_READ, a)
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.2):
                    data = key.fileobj.recv(1 << 16)
                    if not data:
                        return
                    key.data.sendall(data)
                    if key.fileobj is b:  # b is the upstream side: a reply on its way to the client
                        with self._lock:
                            self.bytes_to_client += len(data)
        except (OSError, ValueError):
            return
        finally:
            sel.close()
            a.close()
            b.close()
