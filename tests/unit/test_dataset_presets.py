"""The dataset presets hold the published configuration of SPEC section 7."""

from __future__ import annotations

import pytest

from tf4ctr_dist.config import PRESETS_DIR, load_config

# ssem/dfm, MLP_s, alpha, c, gamma, batch, emb reg, dropout (SPEC section 7)
PUBLISHED = {
    "criteo_x4": ("ser", "wsf", [400, 400], 0.35, 0.9, 1, 4096, 1e-5, 0.2),
    "frappe_x1": ("ser", "wsf", [400, 400], 0.25, 0.7, 1, 10000, 0.1, 0.2),
    "ml_1m": ("ser", "wsf", [400], 0.25, 0.8, 2, 10000, 0.01, 0.1),
    "ml_tag": ("ser", "wsf", [400, 400], 0.25, 0.9, 2, 10000, 0.01, 0.1),
    "kkbox_x1": ("ser", "moef", [400, 400], 0.25, 0.7, 1, 10000, 5e-4, 0.2),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_preset(name: str) -> None:
    cfg = load_config(PRESETS_DIR / f"{name}.yaml")
    got = (
        cfg.model.ssem, cfg.model.dfm, list(cfg.model.easy_hidden_units), cfg.loss.alpha, cfg.loss.c, cfg.loss.gamma,
        cfg.train.batch_size, cfg.train.emb_reg, cfg.model.net_dropout,
    )
    assert got == PUBLISHED[name]
    assert cfg.model.embedding_dim == 16 and cfg.train.lr == 1e-3
    assert list(cfg.train.monitor) == (["AUC"] if name == "criteo_x4" else ["AUC", "gAUC"])


def test_avazu_preset_loads() -> None:
    cfg = load_config(PRESETS_DIR / "avazu_x4.yaml")
    assert cfg.train.batch_size == 10000 and cfg.model.embedding_dim == 16 and cfg.train.emb_reg == 0.0
