"""Ray Serve deployment of an exported model: JSON rows of raw values in, scores out.

POST / with {"rows": [{field: value, ...}, ...]} or {"columns": {field: [values], ...}}
-> 200 {"scores": [p, ...]} (one probability per row, in order).
A request that cannot be scored (not JSON, wrong shape, a missing field, a value that does not
fit the field, such as an object or a list where one value belongs) gets 400 {"error": "..."}
naming the problem (and the row and field); it is checked and mapped on its own before it joins
a batch, so one bad request never fails the others batched with it. One over MAX_BODY_BYTES
(refused by its length, unparsed) or MAX_ROWS rows gets 413.
Concurrent requests are scored together (serve.batch): their mapped ids are concatenated into
one KJT and run as one forward.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tf4ctr_dist.data.errors import DataError

MAX_ROWS = 100_000  # per request: a bigger one is refused (413) rather than held in memory
# Bytes of a request body, refused (413) by its length alone, before it is parsed (or, with a
# Content-Length, read): 4 KiB a row, several times what a row of raw values takes as JSON (a
# Criteo row, 39 fields as an object, is under 1 KiB), so no body of MAX_ROWS real rows is
# near it, while a body that is mostly something else does not get to the parser.
MAX_BODY_BYTES = MAX_ROWS * 4096


class RequestTooLarge(DataError):
    """A request over MAX_BODY_BYTES or MAX_ROWS: answered 413 rather than 400."""


def parse_request(body: bytes, feature_names: list[str]) -> Any:
    """The rows of a request body (see module docstring); DataError with a clear message
    (RequestTooLarge: over MAX_BODY_BYTES, checked before parsing, or over MAX_ROWS)."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestTooLarge(f"request body of {len(body)} bytes; at most {MAX_BODY_BYTES} "
                              f"(a request holds at most {MAX_ROWS} rows)")
    try:
        payload = json.loads(body)
    except RecursionError:  # json's parser recurses once per level of nesting
        raise DataError('request body nests arrays or objects too deep; expected {"rows": [{field: value, ...}, '
                        '...]} or {"columns": {field: [values], ...}}') from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"request body is not JSON ({e})") from None
    if not isinstance(payload, dict) or not ({"rows", "columns"} & set(payload)):
        raise DataError('expected a JSON object {"rows": [{field: value, ...}, ...]} or '
                        '{"columns": {field: [values], ...}}; fields: ' + ", ".join(feature_names))
    rows = payload.get("rows", payload.get("columns"))
    if "rows" in payload and not isinstance(rows, list):
        raise DataError('"rows" should be a list of objects (field -> raw value)')
    if "columns" in payload and "rows" not in payload and not isinstance(rows, dict):
        raise DataError('"columns" should be an object (field -> list of raw values)')
    if "rows" in payload:
        bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
        if bad:
            raise DataError(f'"rows"[{bad[0]}] is not an object (field -> raw value)')
        missing = sorted({n for r in rows for n in feature_names if n not in r})
        if missing:
            raise DataError(f"rows lack field(s) {missing}; every row needs {feature_names}")
    n = row_count(rows)
    if n > MAX_ROWS:
        raise RequestTooLarge(f"{n} rows in one request; at most {MAX_ROWS}")
    return rows


def row_count(rows: Any) -> int:
    """Rows of what parse_request returned (the columns form: its longest column)."""
    return len(rows) if isinstance(rows, list) else max((len(v) for v in rows.values() if isinstance(v, list)),
                                                        default=0)


def _concat(kjts: list[KeyedJaggedTensor]) -> KeyedJaggedTensor:
    """One KJT of several requests' (same keys): per key, the requests' rows in order."""
    if len(kjts) == 1:
        return kjts[0]
    keys = kjts[0].keys()
    parts = [k.to_dict() for k in kjts]
    values = [torch.cat([p[key].values() for p in parts]) for key in keys]
    lengths = [torch.cat([p[key].lengths() for p in parts]) for key in keys]
    weights = None
    if kjts[0].weights_or_none() is not None:  # a model with value x vector fields
        weights = torch.cat([torch.cat([p[key].weights() for p in parts]) for key in keys])
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths).int(), weights=weights)


def scoring_app(path: str, replicas: int = 1, max_batch_size: int = 64, batch_wait_s: float = 0.005,
                precision: Optional[str] = None):
    """The Serve application (bind it with serve.run)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0})
    class TF4CTRScorer:
        def __init__(self, artifact: str) -> None:
            from tf4ctr_dist.serving import load

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, replicas)))
            self.scorer = load(artifact, precision)
            self.score_batch.set_max_batch_size(max_batch_size)
            self.score_batch.set_batch_wait_timeout_s(batch_wait_s)

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
        async def score_batch(self, requests: list[KeyedJaggedTensor]) -> list[list[float]]:
            sizes = [int(k.stride()) for k in requests]
            probs = self.scorer(_concat(requests)).tolist()
            out, start = [], 0
            for n in sizes:
                out.append(probs[start : start + n])
                start += n
            return out

        async def __call__(self, request: Request):
            if request.method != "POST":
                return JSONResponse({"error": "POST a JSON body of rows to score"}, status_code=405)
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > MAX_BODY_BYTES:  # refused unread (parse_request checks the rest)
                return JSONResponse({"error": f"request body of {length} bytes; at most {MAX_BODY_BYTES}"},
                                    status_code=413)
            try:
                rows = parse_request(await request.body(), self.scorer.feature_names)
                if row_count(rows) == 0:
                    return JSONResponse({"scores": []})
                features = self.scorer.features(rows)
            except RequestTooLarge as e:
                return JSONResponse({"error": str(e)}, status_code=413)
            except DataError as e:
                return JSONResponse({"error": str(e)}, status_code=400)
            except (ValueError, TypeError, ArithmeticError) as e:  # e.g. Arrow conversion of odd values
                return JSONResponse({"error": f"cannot read the rows: {e}"}, status_code=400)
            scores = await self.score_batch(features)
            return JSONResponse({"scores": scores})

    return TF4CTRScorer.bind(path)


def start(path: str, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, max_batch_size: int = 64,
          batch_wait_s: float = 0.005, name: str = "tf4ctr", precision: Optional[str] = None) -> str:
    """Start Serve (on the connected Ray cluster, or a private local one on 127.0.0.1) and deploy
    the model (``precision``: model.inference_precision override); returns the URL it answers on."""
    from tf4ctr_dist.serving.export import check_artifact

    check_artifact(path)  # a bad artifact: one DataError here, before Ray, not a failed deployment
    import ray
    from ray import serve

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(scoring_app(os.path.abspath(path), replicas, max_batch_size, batch_wait_s, precision), name=name,
              route_prefix="/")
    return f"http://{host}:{port}/"


def serve_forever(path: str, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
                  max_batch_size: int = 64, batch_wait_s: float = 0.005, precision: Optional[str] = None) -> None:
    # Keep a private local cluster on loopback (set before ray's first import; see train.launch).
    if "ray" not in sys.modules and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    url = start(path, host, port, replicas, max_batch_size, batch_wait_s, precision=precision)
    print(f"[tf4ctr] serving {path} at {url} (POST JSON rows; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
