"""URLs with embedded credentials are refused where they enter (config, storage, checkpoints),
with a message that never repeats the secret and points to the environment instead."""

from __future__ import annotations

import pytest

from tf4ctr_dist.config import ConfigError, RunConfig, load_config
from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.storage import resolve
from tf4ctr_dist.distributed.checkpoint import CheckpointStore

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzz"
URLS = {
    "http": f"http://alice:{SECRET}@127.0.0.1:9000/bucket/ds",
    "s3": f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/ds",
    "s3, a secret with / and +": f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET[:10]}/K7+{SECRET[10:]}@bucket/ds",
    "chained": f"simplecache::s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/ds",
    "pre-signed": f"https://bucket.s3.amazonaws.com/ds?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE&X-Amz-Signature={SECRET}",
}


@pytest.mark.parametrize("form", sorted(URLS))
@pytest.mark.parametrize("key", ["data.url", "out", "checkpoint.root", "checkpoint.warm_start"])
def test_config_refuses_credentials_in_urls(form: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        RunConfig().with_overrides({key: URLS[form]})
    text = str(exc.value)
    assert key in text and "environment" in text and "storage_options" in text
    assert SECRET[10:] not in text and "AKIAIOSFODNN7EXAMPLE" not in text and "alice" not in text


@pytest.mark.parametrize("form", sorted(URLS))
def test_config_file_and_storage_and_checkpoints_refuse_them(tmp_path, form: str) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data:\n  url: {URLS[form]}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert SECRET[10:] not in str(exc.value)
    with pytest.raises(DataError, match="carries credentials") as exc:
        resolve(URLS[form])  # prepare --out, check, the reader
    assert SECRET[10:] not in str(exc.value)
    with pytest.raises(ConfigError, match="carries credentials") as exc:
        CheckpointStore(URLS[form], 0, 1)
    assert SECRET[10:] not in str(exc.value)


def test_plain_urls_still_work() -> None:
    RunConfig().with_overrides({"data.url": "s3://bucket/ds", "out": "http://host:9000/b/out"})
    for url in ("http://127.0.0.1:9000/bucket/ds", "s3://bucket/logs/day@2026-12-01", "s3://bucket/a:b@c",
                "/data/path:with@at", "simplecache::s3://bucket/ds"):
        RunConfig().with_overrides({"data.url": url})


def test_messages_lose_every_form_of_secret() -> None:
    from tf4ctr_dist.data.storage import redact

    for form, url in URLS.items():
        text = redact(f"cannot read {url}/train/part-00000.parquet (timeout)")
        assert SECRET[10:] not in text and "AKIAIOSFODNN7EXAMPLE" not in text, (form, text)
        assert text.startswith("cannot read ") and text.endswith(" (timeout)")
