"""`tf4ctr serve`'s deployment: Ray Serve on 127.0.0.1 answers 1,000 raw rows posted in batches
with the scores `serving.load(FILE).score` gives, refuses malformed requests with a 400 and a
message, and keeps serving after them."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from tests.integration._ray_local import free_port
from tests.serving_data import fresh_artifact, prepare


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback-only local cluster
    import ray
    from ray import serve

    from tf4ctr_dist.serving.deploy import start

    folder = tmp_path_factory.mktemp("serve")
    url, (_, _, test_csv) = prepare(folder)
    _, path = fresh_artifact(url, str(folder / "m.tf4ctr"))
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        endpoint = start(path, host="127.0.0.1", port=port, max_batch_size=8, batch_wait_s=0.01)
        yield endpoint, path, test_csv, port
    finally:
        serve.shutdown()
        ray.shutdown()


def test_scores_match_the_artifact_and_bad_requests_get_400(server):
    from tf4ctr_dist.serving import load

    endpoint, path, test_csv, port = server
    assert endpoint == f"http://127.0.0.1:{port}/"
    raw = pacsv.read_csv(test_csv, convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in "label a b u".split()}))
    rows = raw.select(["a", "b", "u"]).to_pylist()
    assert len(rows) == 1000
    expected = load(path).score(raw)
    chunks = [rows[i : i + 50] for i in range(0, 1000, 50)]
    # concurrent posts, so serve.batch puts several requests into one forward
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: _post(endpoint, json.dumps({"rows": c}).encode()), chunks))
    assert all(code == 200 for code, _ in answers), answers[:2]
    got = np.concatenate([np.asarray(a["scores"], dtype=np.float32) for _, a in answers])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # the columns form too
    code, answer = _post(endpoint, json.dumps({"columns": {k: raw.column(k).to_pylist()[:5] for k in "abu"}}).encode())
    assert code == 200 and np.allclose(answer["scores"], expected[:5], atol=1e-6)

    bad = [(b"{not json", "not JSON"), (b'{"rows": [{"a": "a1", "b": "b1"}]}', "lack field(s) ['u']"),
           (b'{"rows": 7}', "should be a list"), (b'{"x": 1}', "expected a JSON object"),
           (b'{"columns": {"a": ["a1", "a2"], "b": ["b1"], "u": ["u1", "u2"]}}', "different lengths")]
    for body, message in bad:
        code, answer = _post(endpoint, body)
        assert code == 400, (body, code, answer)
        assert message in answer["error"], answer
    # still serving, with the same answers
    code, answer = _post(endpoint, json.dumps({"rows": rows[:20]}).encode())
    assert code == 200 and np.allclose(answer["scores"], expected[:20], atol=1e-6)
