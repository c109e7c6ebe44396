"""Local Ray clusters for the integration tests: `ray start` nodes on this machine with their
own temp dir and free ports, stopped by process id (never `ray stop`, which would stop every
Ray process on the machine), and the listening sockets of a set of processes from /proc."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(name))
    return out


def process_tree(roots: list[int]) -> list[int]:
    """The given processes and all their descendants."""
    children = _children()
    seen: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo.extend(children.get(pid, []))
    return seen


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _listening_inodes() -> dict[int, tuple[str, str, int]]:
    """socket inode -> (tcp|tcp6, address, port) for every listening TCP socket."""
    out = {}
    for proto, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/net/{proto}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out[int(fields[9])] = (proto, socket.inet_ntop(family, raw), int(hex_port, 16))
    return out


def listening_sockets(pids: list[int]) -> list[dict]:
    """[{pid, name, proto, address, port}] for every listening TCP socket these processes hold."""
    inodes = _listening_inodes()
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                proto, address, port = inodes[int(target[8:-1])]
                found.append({"pid": pid, "name": _comm(pid), "proto": proto, "address": address, "port": port})
    return sorted(found, key=lambda s: (s["name"], s["port"]))


def is_loopback(address: str) -> bool:
    return address == "::1" or address.startswith(("127.", "::ffff:127."))


class LocalCluster:
    """A head node (and optionally more nodes) started with `ray start` on 127.0.0.1."""

    def __init__(self, env: dict | None = None):
        # Short: Ray puts Unix sockets under it (107-byte path limit).
        self.temp_dir = tempfile.mkdtemp(prefix="tfr", dir="/tmp")
        # Not inherited: a test's own Ray address, or the loopback-only switch that `_init_ray`
        # sets in this process (it makes `ray start --address` refuse to join).
        inherited = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
        self.env = {**inherited, **(env or {})}
        self._pick_head_ports()

    def _pick_head_ports(self) -> None:
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    def _node_ports(self) -> list[str]:
        return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    def _ray(self, args: list[str], timeout: float = 120) -> None:
        proc = subprocess.run([RAY, *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"ray {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    def start_head(self, num_cpus: int, resources: str | None = None, include_dashboard: bool = True) -> None:
        try:
            self._start_head(num_cpus, resources, include_dashboard)
        except RuntimeError as e:
            # On a loaded 2-core machine `ray start` can give up on its own GCS ("Failed to get
            # node info ... Deadline Exceeded") before the GCS answers: clear what started and try
            # once more on fresh ports. Any other failure is the test's.
            if "Deadline Exceeded" not in str(e):
                raise
            self.stop()
            os.makedirs(self.temp_dir, exist_ok=True)  # stop() removes it
            self._pick_head_ports()
            self._start_head(num_cpus, resources, include_dashboard)

    def _start_head(self, num_cpus: int, resources: str | None, include_dashboard: bool) -> None:
        args = ["start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
                f"--temp-dir={self.temp_dir}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                f"--ray-client-server-port={free_port()}", "--disable-usage-stats", *self._node_ports()]
        if include_dashboard:
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        if resources:
            args.append(f"--resources={resources}")
        self._ray(args)

    def add_node(self, num_cpus: int, resources: str | None = None) -> None:
        # A second raylet on the same machine: its own temp dir (sockets), same GCS.
        args = ["start", f"--address={self.gcs_address}", "--node-ip-address=127.0.0.1",
                f"--num-cpus={num_cpus}", "--num-gpus=0", "--disable-usage-stats", *self._node_ports()]
        if resources:
            args.append(f"--resources={resources}")
        self._ray(args)

    def pids(self) -> list[int]:
        """Every process of this cluster: those naming its temp dir and their descendants."""
        roots = [int(p) for p in os.listdir("/proc") if p.isdigit() and self.temp_dir in _cmdline(int(p))]
        return process_tree(roots)

    def stop(self, grace_s: float = 10.0) -> None:
        pids = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and _comm(p) != "?" and
                                                      not _is_zombie(p) for p in pids):
                time.sleep(0.2)
            if sig == signal.SIGTERM:
                pids = [p for p in pids if os.path.exists(f"/proc/{p}") and not _is_zombie(p)]
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
