"""A TCP proxy on 127.0.0.1 in front of the moto server that stages S3 outages.

During an outage the listening socket is closed and every open connection dropped, so clients
get "connection refused" (what a dead endpoint looks like). An outage starts either when the
test says so (`outage(seconds)`) or on the first forwarded request whose HTTP request line
matches an armed trigger (`arm`; moto speaks plain HTTP), so it lands where the test wants it
whatever the timing. The proxy stops itself after `lifetime_s`.
"""

from __future__ import annotations

import re
import socket
import threading
import time

from tests.s3server import free_port

# A request line (method and target); a request body may hold anything, but Parquet and tensor
# bytes do not spell one in practice.
_REQUEST_LINE = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (/\S*) HTTP/1\.[01]\r\n")


class OutageProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`.

    `outage(s)`: refuse connections for s seconds from now.
    `arm(name, method, target, seconds)`: the first request whose method fully matches `method`
    and whose target matches `target` (regexes) is not forwarded and starts an outage of
    `seconds`; each trigger fires once. `outages` lists them as they happened; `connections`
    counts the accepted connections and `requests` the forwarded request lines."""

    def __init__(self, target_port: int, lifetime_s: float = 600) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.outages: list[dict] = []  # {"trigger", "request", "at", "until"}
        self.connections = 0
        self.requests = 0
        self._deadline = time.monotonic() + lifetime_s
        self._triggers: list[tuple[str, re.Pattern, re.Pattern, float]] = []
        self._refused_until = 0.0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._stopped = threading.Event()
        self._listener: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def outage(self, seconds: float, trigger: str = "manual", request: str = "") -> None:
        with self._lock:
            self._start_outage(seconds, trigger, request)

    def arm(self, name: str, method: str, target: str, seconds: float) -> None:
        with self._lock:
            self._triggers.append((name, re.compile(method.encode()), re.compile(target.encode()), seconds))

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        with self._lock:
            self._close_all()

    def _start_outage(self, seconds: float, trigger: str, request: str) -> None:
        now = time.monotonic()
        self._refused_until = now + seconds
        if seconds > 0:
            self.outages.append({"trigger": trigger, "request": request, "at": now, "until": self._refused_until})
        self._close_all()

    def _close_all(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for s in self._socks:
            _kill(s)
        self._socks.clear()

    def _check(self, method: bytes, target: bytes) -> bool:
        """Count a request; True when it starts an outage (which then has started)."""
        with self._lock:
            self.requests += 1
            for trigger in self._triggers:
                name, m, t, seconds = trigger
                if m.fullmatch(method) and t.search(target):
                    self._triggers.remove(trigger)
                    self._start_outage(seconds, name, f"{method.decode()} {target.decode()}")
                    return True
        return False

    def _serve(self) -> None:
        while not self._stopped.is_set() and time.monotonic() < self._deadline:
            with self._lock:
                if self._listener is None and time.monotonic() >= self._refused_until:
                    listener = socket.socket()
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    listener.bind(("127.0.0.1", self.port))
                    listener.listen(128)
                    listener.settimeout(0.1)
                    self._listener = listener
                listener = self._listener
            if listener is None:
                time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except OSError:  # timeout, or closed by an outage
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _kill(client)
                continue
            with self._lock:
                if self._listener is not listener:  # an outage began meanwhile
                    _kill(client)
                    _kill(upstream)
                    continue
                self._socks += [client, upstream]
                self.connections += 1
            threading.Thread(target=self._forward_requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        with self._lock:
            self._close_all()

    def _forward_requests(self, src: socket.socket, dst: socket.socket) -> None:
        """client -> server, watching request lines. A request line may be split between two
        reads: the previous read's tail is searched again, and only matches that end in the new
        bytes are counted."""
        src.settimeout(None)
        tail = b""
        try:
            while data := src.recv(65536):
                window = tail + data
                for match in _REQUEST_LINE.finditer(window):
                    if match.end() > len(tail) and self._check(match.group(1), match.group(2)):
                        return  # dropped: the server never sees this request
                dst.sendall(data)
                tail = window[-4096:]
        except OSError:
            pass
        finally:
            _kill(src)
            _kill(dst)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        src.settimeout(None)  # raises when the other direction already closed this socket
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    _kill(src)
    _kill(dst)


def _kill(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
    except OSError:
        pass
    s.close()
