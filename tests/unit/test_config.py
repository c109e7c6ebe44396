"""RunConfig: files, dotted / short overrides, strict keys and types, shipped configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from tf4ctr_dist.config import PRESETS_DIR, ConfigError, LossConfig, ModelConfig, RunConfig, TrainConfig, load_config

CONFIGS = sorted(PRESETS_DIR.glob("*.yaml"))


# ---- unknown keys -----------------------------------------------------------------------------


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key.*'modle'"):
        RunConfig.from_dict({"modle": {"embedding_dim": 8}})


def test_unknown_section_key_is_named_with_its_section() -> None:
    with pytest.raises(ConfigError, match=r"'model\.embeding_dim'") as e:
        RunConfig.from_dict({"model": {"embedding_dim": 8, "embeding_dim": 8}})
    assert "embedding_dim" in str(e.value)  # the accepted keys are listed


@pytest.mark.parametrize("override", ["embeding_dim=8", "model.embeding_dim=8", "train.alpha=0.3",
                                      "bogus.lr=0.1", "model.mlp.units=4", "model=3"])
def test_unknown_override_key(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig().with_overrides([override])


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        RunConfig().with_overrides(["lr"])


def test_unknown_key_in_yaml_file_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  embedding_dim: 8\ntrain:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "'train.lrr'" in str(e.value)


def test_unknown_key_in_json_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"loss": {"alpah": 0.3}}))
    with pytest.raises(ConfigError, match=r"'loss\.alpah'"):
        load_config(path)


# ---- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("ssem=serr", r"model\.ssem: 'serr' is not one of"),
        ("dfm=concat", r"model\.dfm: 'concat' is not one of"),
        ("loss=mse", r"loss\.loss: 'mse' is not one of"),
        ("sharding=rowwise", r"train\.sharding: 'rowwise' is not one of"),
        ("emb_reg_mode=all", r"train\.emb_reg_mode: 'all' is not one of"),
        ("embedding_optimizer=Adam", r"train\.embedding_optimizer: 'Adam' is not one of"),
    ],
)
def test_bad_literal(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig().with_overrides([override])


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model": {"embedding_dim": "big"}}, r"model\.embedding_dim: expected an integer"),
        ({"model": {"embedding_dim": 8.5}}, r"model\.embedding_dim: expected an integer"),
        ({"model": {"embedding_dim": True}}, r"model\.embedding_dim: expected an integer"),
        ({"train": {"lr": "fast"}}, r"train\.lr: expected a number"),
        ({"train": {"lr": False}}, r"train\.lr: expected a number"),
        ({"model": {"batch_norm": 1}}, r"model\.batch_norm: expected true/false"),
        ({"model": {"easy_hidden_units": [400, "wide"]}}, r"model\.easy_hidden_units: expected an integer"),
        ({"model": {"easy_hidden_units": {"a": 1}}}, r"model\.easy_hidden_units: expected a list"),
        ({"loss": {"m": "one"}}, r"loss\.m: expected a number"),
        ({"data": {"url": 3}}, r"data\.url: expected a string"),
        ({"model": [16]}, r"model: expected a mapping"),
        ([1, 2], r"expected a mapping"),
    ],
)
def test_type_errors_name_the_key(raw, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(raw)  # type: ignore[arg-type]


def test_values_are_coerced_to_the_declared_types() -> None:
    cfg = RunConfig.from_dict({"train": {"epochs": 3.0, "lr": 1, "emb_reg": "1e-5"}, "loss": {"m": 2}})
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.emb_reg == 1e-5 and isinstance(cfg.train.emb_reg, float)
    assert cfg.loss.m == 2.0 and isinstance(cfg.loss.m, float)


# ---- overrides --------------------------------------------------------------------------------


def test_short_keys_resolve_to_their_section() -> None:
    cfg = RunConfig().with_overrides(["alpha=0.4", "embedding_dim=8", "lr=0.01", "workers=3", "url=/data/x"])
    assert cfg.loss.alpha == 0.4
    assert cfg.model.embedding_dim == 8
    assert cfg.train.lr == 0.01
    assert cfg.cluster.workers == 3
    assert cfg.data.url == "/data/x"


def test_loss_is_both_a_section_and_a_key() -> None:
    """`loss=bce` sets loss.loss (the section cannot be replaced by a scalar)."""
    assert RunConfig().with_overrides(["loss=bce"]).loss.loss == "bce"
    assert RunConfig().with_overrides(["loss.loss=focal"]).loss.loss == "focal"


def test_top_level_keys_and_dotted_keys() -> None:
    cfg = RunConfig().with_overrides(["out=runs/x", "name=demo", "model.embedding_dim=4",
                                      "train.batch_size=64", "loss.gamma=2", "cluster.use_gpu=true"])
    assert (cfg.out, cfg.name) == ("runs/x", "demo")
    assert cfg.model.embedding_dim == 4 and cfg.train.batch_size == 64
    assert cfg.loss.gamma == 2.0 and isinstance(cfg.loss.gamma, float)
    assert cfg.cluster.use_gpu is True


def test_a_nested_section_by_its_own_name() -> None:
    """`encoders.cross_layers` (as README's table writes it) is model.encoders.cross_layers; a
    mistake there lists the nested section's keys, and a key with no close match lists the sections."""
    assert RunConfig().with_overrides(["encoders.cross_layers=2"]).model.encoders.cross_layers == 2
    assert RunConfig().with_overrides(["model.encoders.cross_layers=4"]).model.encoders.cross_layers == 4
    with pytest.raises(ConfigError, match=r"did you mean 'model.encoders.cross_layers'\? model.encoders has: "
                                          r"afn_hidden_units"):
        RunConfig().with_overrides(["encoders.crosslayers=2"])
    with pytest.raises(ConfigError, match=r"^unknown config key 'bogus_key'; sections: data, model"):
        RunConfig().with_overrides(["bogus_key=1"])


def test_every_field_name_is_unambiguous_or_dotted() -> None:
    """Short keys work only because no field name is shared by two sections."""
    owners: dict[str, list[str]] = {}
    for section in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(section.default_factory):  # type: ignore[arg-type]
            for f in dataclasses.fields(section.default_factory):  # type: ignore[arg-type]
                owners.setdefault(f.name, []).append(section.name)
    shared = {k: v for k, v in owners.items() if len(v) > 1}
    assert not shared
    for name, (section,) in owners.items():
        value = getattr(getattr(RunConfig(), section), name)
        cfg = RunConfig().with_overrides({name: value})
        assert getattr(getattr(cfg, section), name) == value


def test_ambiguous_short_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Were a field name shared by two sections, the short key must not pick one silently."""
    import tf4ctr_dist.config as config

    @dataclasses.dataclass
    class Other:
        alpha: float = 0.0

    sections = config._section_classes()
    monkeypatch.setattr(config, "_section_classes", lambda: {**sections, "other": Other})
    with pytest.raises(ConfigError, match=r"ambiguous.*'loss\.alpha'.*'other\.alpha'"):
        config._resolve_key("alpha")
    assert config._resolve_key("loss.alpha") == ["loss", "alpha"]


@pytest.mark.parametrize(
    "override, section, key, expected",
    [
        ("easy_hidden_units=[400,400]", "model", "easy_hidden_units", [400, 400]),
        ("hard_hidden_units=[64, 32, 16]", "model", "hard_hidden_units", [64, 32, 16]),
        ("easy_hidden_units=64", "model", "easy_hidden_units", [64]),
        ("easy_hidden_units=[]", "model", "easy_hidden_units", []),
        ("easy_hidden_units=64,32", "model", "easy_hidden_units", [64, 32]),
        ("monitor=[AUC]", "train", "monitor", ["AUC"]),
        ("monitor=AUC,gAUC", "train", "monitor", ["AUC", "gAUC"]),
    ],
)
def test_list_overrides(override: str, section: str, key: str, expected: list) -> None:
    got = getattr(getattr(RunConfig().with_overrides([override]), section), key)
    assert got == expected and all(type(g) is type(e) for g, e in zip(got, expected))


@pytest.mark.parametrize(
    "override, section, key, expected",
    [
        ("emb_reg=1e-5", "train", "emb_reg", 1e-5),  # YAML 1.1 reads "1e-5" as a string
        ("lr=1E-3", "train", "lr", 1e-3),
        ("min_lr=5e-7", "train", "min_lr", 5e-7),
        ("net_dropout=0", "model", "net_dropout", 0.0),
        ("m=1.5", "loss", "m", 1.5),
        ("m=none", "loss", "m", None),
        ("embedding_lr=null", "train", "embedding_lr", None),
        ("embedding_lr=2e-2", "train", "embedding_lr", 0.02),
        ("batch_norm=false", "model", "batch_norm", False),
        ("shuffle=True", "data", "shuffle", True),
        ("ray_address=None", "cluster", "ray_address", None),
    ],
)
def test_scalar_override_parsing(override: str, section: str, key: str, expected) -> None:
    got = getattr(getattr(RunConfig().with_overrides([override]), section), key)
    assert got == expected and type(got) is type(expected)


def test_string_fields_keep_the_override_text() -> None:
    """A str field takes the override as written, even when YAML would read a number."""
    cfg = RunConfig().with_overrides(["name=2023", "train_split=001", "out=runs/1e-5"])
    assert (cfg.name, cfg.data.train_split, cfg.out) == ("2023", "001", "runs/1e-5")


def test_overrides_return_a_new_config() -> None:
    base = RunConfig()
    new = base.with_overrides(["alpha=0.5", "easy_hidden_units=[8]"])
    assert new.loss.alpha == 0.5 and new.model.easy_hidden_units == [8]
    assert base.loss.alpha == LossConfig().alpha and base.model.easy_hidden_units == ModelConfig().easy_hidden_units


def test_dict_overrides_take_values_as_given() -> None:
    cfg = RunConfig().with_overrides({"train.lr": 0.5, "monitor": ["AUC"], "ssem": "gm"})
    assert cfg.train.lr == 0.5 and cfg.train.monitor == ["AUC"] and cfg.model.ssem == "gm"
    with pytest.raises(ConfigError, match="ssem"):
        RunConfig().with_overrides({"ssem": "nope"})


def test_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  emb_reg: 1e-5\nmodel:\n  embedding_dim: 8\n")
    cfg = load_config(path, ["embedding_dim=4", "train.lr=2e-4"])
    assert cfg.model.embedding_dim == 4  # the override wins
    assert cfg.train.lr == 2e-4
    assert cfg.train.emb_reg == 1e-5 and isinstance(cfg.train.emb_reg, float)  # "1e-5" in YAML
    assert cfg.train.batch_size == TrainConfig().batch_size  # untouched keys keep defaults
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == RunConfig()
    assert load_config() == RunConfig()


# ---- shipped configs --------------------------------------------------------------------------


def test_shipped_configs_exist() -> None:
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "criteo_x4.yaml", "frappe_x1.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads_and_round_trips(path: Path) -> None:
    cfg = load_config(path)
    # Every value written in the file is what the config holds (nothing dropped or renamed).
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():
        if not isinstance(values, dict):
            assert getattr(cfg, section) == values
            continue
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            if dataclasses.is_dataclass(got):  # a nested section (model.encoders): the keys written
                got = {k: v for k, v in dataclasses.asdict(got).items() if k in value}
            assert got == (float(value) if isinstance(got, float) else value), f"{section}.{key}"
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
