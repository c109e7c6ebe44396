"""A whole Ray Train run rides out two S3 outages: a proxy on 127.0.0.1 in front of the moto
server refuses connections for 20 s while the workers read the training data, and again while
they upload a checkpoint. The run finishes without a Ray Train restart (3 were allowed) and
with the metrics of an undisturbed run of the same config.

The proxy starts each outage itself, on the first request (HTTP request line, moto speaks plain
HTTP) that matches a pattern, so the outages land where the test says whatever the timing."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.s3server import S3Server, free_port

OUTAGE_S = 20.0  # as the issue asks
# Any of these in a request's line (method and target) is counted as one request.
_REQUEST_LINE = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (/\S*) HTTP/1\.[01]\r\n")


class TriggeredOutageProxy:
    """Forwards 127.0.0.1:port to `target_port` and reads the request lines it forwards. `arm`
    adds a trigger (method and target regexes): the first request that matches it is not
    forwarded; its connection and every other one are dropped and the listening socket stays
    closed for `outage_s` seconds (new connections are refused). Each trigger fires once."""

    def __init__(self, target_port: int, outage_s: float = OUTAGE_S) -> None:
        self.target_port = target_port
        self.outage_s = outage_s
        self.port = free_port()
        self.outages: list[dict] = []  # {"trigger", "request", "at", "until"}, as they happened
        self.requests = 0
        self._triggers: list[tuple[str, re.Pattern, re.Pattern]] = []
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

    def arm(self, name: str, method: str, target: str) -> None:
        with self._lock:
            self._triggers.append((name, re.compile(method.encode()), re.compile(target.encode())))

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        with self._lock:
            self._close_all()

    def _close_all(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for s in self._socks:
            _kill(s)
        self._socks.clear()

    def _check(self, method: bytes, target: bytes) -> bool:
        """Whether this request starts an outage (then the outage has started)."""
        with self._lock:
            self.requests += 1
            for trigger in self._triggers:
                name, m, t = trigger
                if m.fullmatch(method) and t.search(target):
                    self._triggers.remove(trigger)
                    now = time.monotonic()
                    self._refused_until = now + self.outage_s
                    self.outages.append({"trigger": name, "request": f"{method.decode()} {target.decode()}",
                                         "at": now, "until": self._refused_until})
                    self._close_all()
                    return True
        return False

    def _serve(self) -> None:
        while not self._stopped.is_set():
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
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()

    def _requests(self, src: socket.socket, dst: socket.socket) -> None:
        """client -> server, watching request lines. A request line may be split between two
        reads: the previous read's tail is searched again, and only matches that end in the new
        bytes are counted (bodies are Parquet or tensors: no false request lines in practice)."""
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
    src.settimeout(None)
    try:
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


@pytest.fixture(scope="module")
def proxy(s3_server: S3Server):
    """The proxy, and the environment that Ray's workers inherit pointing at it: the local
    cluster starts in this module (from this process's environment), with a checkpoint key."""
    import importlib.util
    import sys

    import s3fs

    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed")
    # Not imported here: run_training must import ray first to keep the cluster on 127.0.0.1.
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()  # a cluster of another module would keep the old endpoint
    p = TriggeredOutageProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]))
    env = {"AWS_ENDPOINT_URL": p.endpoint, "TF4CTR_CHECKPOINT_KEY": "outage-test-key"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield p
    finally:
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()
        p.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


def _config(url: str, out: Path, checkpoints: str):
    from tf4ctr_dist.config import RunConfig

    return RunConfig().with_overrides([
        f"data.url={url}", f"out={out}", f"checkpoint.root={checkpoints}", "name=outage",
        "cluster.workers=2", "cluster.max_failures=3", "train.batch_size=256", "train.eval_batch_size=2048",
        "train.epochs=2", "train.monitor=[AUC]", "train.log_every=0", "easy_hidden_units=[16]",
        "hard_hidden_units=[16,16]", "embedding_dim=8", "data.storage_retry_seconds=120",
    ])


def _workers_started() -> int:
    import ray
    from ray.util.state import list_actors

    # This cluster's address: other Ray clusters may run on the machine.
    actors = list_actors(address=ray.get_runtime_context().gcs_address, detail=True, limit=10_000)
    return len([a for a in actors if a.class_name == "RayTrainWorker"])


_TIMING = {"train_seconds", "samples_per_s", "valid_seconds"}  # of a history record (train/loop.py)


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in _TIMING} for record in history]


def test_a_run_rides_out_a_read_and_a_checkpoint_outage(s3_server: S3Server, proxy: TriggeredOutageProxy,
                                                        tmp_path: Path) -> None:
    from data_tools.synthetic import generate_synthetic

    from tf4ctr_dist.distributed.checkpoint import CheckpointIntegrityError, CheckpointStore
    from tf4ctr_dist.train.launch import run_training

    url = s3_server.url("datasets", "training-outage")
    manifest = generate_synthetic(url, rows=8_000, fields=6, scale_vocab=0.05, seed=5, row_group_rows=800,
                                  row_groups_per_part=2, storage_options=s3_server.storage_options)
    train_parts = [p.path for p in manifest.splits["train"].parts]
    assert len(train_parts) >= 3
    # Setup reads the first train part's labels (check_label_classes): a GET of any later part
    # comes from the training reader, in the first epoch.
    read_target = "(" + "|".join(re.escape(p) for p in train_parts[1:]) + r")(\?|$)"

    started = time.monotonic()
    undisturbed = run_training(_config(url, tmp_path / "undisturbed", s3_server.url("runs", "undisturbed", "ckpt")))
    undisturbed_s = time.monotonic() - started
    assert proxy.outages == [] and proxy.requests > 0  # it went through the proxy too
    workers_before = _workers_started()
    assert workers_before == 2

    proxy.arm("read", "GET", "/datasets/training-outage/" + read_target)
    proxy.arm("checkpoint upload", "PUT|POST", r"/runs/disturbed/ckpt/e\d{4}-s\d{6}/.*\.distcp")
    started = time.monotonic()
    disturbed = run_training(_config(url, tmp_path / "disturbed", s3_server.url("runs", "disturbed", "ckpt")))
    disturbed_s = time.monotonic() - started
    workers = _workers_started() - workers_before
    print(f"\nundisturbed run {undisturbed_s:.0f} s, with the outages {disturbed_s:.0f} s; outages: "
          + "; ".join(f"{o['trigger']} ({o['request']})" for o in proxy.outages))

    # Both outages happened, during this run, and were waited out.
    assert [o["trigger"] for o in proxy.outages] == ["read", "checkpoint upload"]
    assert all(started < o["at"] and o["until"] < time.monotonic() for o in proxy.outages)
    assert disturbed_s >= 2 * OUTAGE_S
    # No Ray Train restart: one worker group of 2 (a restart would start 2 more workers).
    assert workers == 2
    # The metrics of the undisturbed run, exactly.
    assert disturbed["valid"] == undisturbed["valid"] and disturbed["test"] == undisturbed["test"]
    assert disturbed["epochs"] == undisturbed["epochs"] == 2
    assert _untimed(disturbed["history"]) == _untimed(undisturbed["history"])
    assert json.loads((tmp_path / "disturbed" / "result.json").read_text())["test"] == undisturbed["test"]

    # The checkpoint written through the outage is complete, and the workers signed its index
    # with the key they inherited from this process (TF4CTR_CHECKPOINT_KEY).
    store = CheckpointStore(s3_server.url("runs", "disturbed", "ckpt"), 0, 1)
    assert store.latest() is not None and store.latest().finished
    os.environ["TF4CTR_CHECKPOINT_KEY"] = "another-key"
    try:
        with pytest.raises(CheckpointIntegrityError, match="hmac mismatch"):
            CheckpointStore(s3_server.url("runs", "disturbed", "ckpt"), 0, 1).entries()
    finally:
        os.environ["TF4CTR_CHECKPOINT_KEY"] = "outage-test-key"
