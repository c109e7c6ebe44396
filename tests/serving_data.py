"""A tiny BARS-style CSV dataset for the serving tests: two counted fields and one hashed field,
labels from a known rule (a model learns it within an epoch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SMALL = ["easy_hidden_units=[16]", "hard_hidden_units=[16,16]", "embedding_dim=8"]


def write_raw(folder: Path, rows: tuple[int, int, int] = (4000, 1000, 1000), seed: int = 0) -> tuple[str, str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for split, n in zip(("train", "valid", "test"), rows):
        a, b, u = rng.integers(0, 30, n), rng.integers(0, 50, n), rng.integers(0, 200, n)
        z = (a % 3 == 0) * 1.5 - (b % 4 == 1) * 1.2 + (u % 5 == 0) * 0.8 - 0.3
        y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
        # a few missing cells: they map to OOV (counted) or the hash of "" (hashed)
        lines = ["label,a,b,u"] + [f"{y[i]},{'' if i % 97 == 5 else f'a{a[i]}'},b{b[i]},{'' if i % 89 == 3 else f'u{u[i]}'}"
                                   for i in range(n)]
        path = folder / f"{split}.csv"
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    return tuple(paths)  # type: ignore[return-value]


def prepare(folder: Path, rows: tuple[int, int, int] = (4000, 1000, 1000)) -> tuple[str, tuple[str, str, str]]:
    """(dataset URL, raw CSV paths); rows: of train, valid, test."""
    from data_tools.bars_csv import prepare_bars_csv

    raw = write_raw(folder / "raw", rows)
    url = str(folder / "dataset")
    prepare_bars_csv(*raw, url, field_options={"u": {"vocab_mode": "hashed", "buckets": 64}})
    return url, raw


def fresh_artifact(url: str, path: str, seed: int = 3) -> tuple[torch.nn.Module, str]:
    """An artifact of an untrained (seeded) model over the dataset, through write_artifact."""
    import torch

    from tf4ctr_dist.config import RunConfig
    from tf4ctr_dist.data.manifest import load_manifest
    from tf4ctr_dist.serving.export import build_model, read_vocabularies, write_artifact

    cfg = RunConfig().with_overrides([f"data.url={url}", *SMALL])
    manifest = load_manifest(url)
    torch.manual_seed(seed)
    model = build_model(manifest, cfg)
    with torch.no_grad():  # wide tables and non-trivial BatchNorm statistics: a lost tensor shows
        for name, p in model.named_parameters():
            if "embedding_bags" in name:
                p.uniform_(-1, 1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    state = model.state_dict()
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    write_artifact(path, cfg, manifest, read_vocabularies(url, manifest), specs, iter(state.items()), {"test": True})
    return model.eval(), path
