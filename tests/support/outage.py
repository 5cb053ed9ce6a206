"""Storage outages on demand: a TCP proxy in front of the test S3 server that a test switches
off (new connections refused, open ones cut) and on again. The S3 server behind it keeps its
state, as a real one does through a network outage."""

from __future__ import annotations

import random
import re
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

# Below Linux's ephemeral range (32768-60999): while the proxy is off, no outgoing connection
# can take its port, so switching it on can bind that port again.
_PORTS = range(20000, 32000)


@dataclass
class _Trigger:
    request: re.Pattern[bytes]
    outage_seconds: float | None


class StorageOutage:
    """`endpoint` forwards to `upstream` while on. `cut_when(request, seconds)` switches it off
    when a request line matches (that request never reaches S3) and on again `seconds` later,
    or never (None); `begun` lists the requests that began an outage."""

    def __init__(self, upstream: str):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.begun: list[str] = []
        self._triggers: list[_Trigger] = []
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        for port in random.sample(_PORTS, 50):
            try:
                self._listen(port)
                break
            except OSError:  # taken
                continue
        else:
            raise RuntimeError(f"no free port in {_PORTS}")
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"

    # -- switching ----------------------------------------------------------------------

    @property
    def is_on(self) -> bool:
        return self._listener is not None

    def on(self) -> None:
        with self._lock:
            if self._listener is None:
                self._listen(self.port)

    def off(self) -> None:
        with self._lock:
            if self._listener is not None:
                _cut(self._listener)  # shutdown() ends the accept() waiting on it; close() alone would not
                self._listener = None
            for connection in self._connections:
                _cut(connection)
            self._connections.clear()

    def cut_when(self, request: bytes, outage_seconds: float | None) -> None:
        """Go off at the first request whose request line matches the regex `request`, e.g.
        rb"PUT /[^ ]*/checkpoint-4/"; back on after `outage_seconds`, or never (None)."""
        with self._lock:
            self._triggers.append(_Trigger(re.compile(request), outage_seconds))

    def close(self) -> None:
        self._triggers.clear()
        self.off()

    # -- forwarding ---------------------------------------------------------------------

    def _listen(self, port: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed: the proxy is off
                return
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._connections |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, requests: bool) -> None:
        try:
            while data := source.recv(65536):
                if requests and self._triggered(data):
                    return
                target.sendall(data)
        except OSError:
            pass
        finally:
            _cut(source)
            _cut(target)

    def _triggered(self, data: bytes) -> bool:
        with self._lock:
            trigger = next((t for t in self._triggers if t.request.search(data)), None)
            if trigger is None:
                return False
            self._triggers.remove(trigger)
            self.begun.append(trigger.request.pattern.decode())
        self.off()
        if trigger.outage_seconds is not None:
            timer = threading.Timer(trigger.outage_seconds, self.on)
            timer.daemon = True
            timer.start()
        return True


def _cut(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    connection.close()
