"""A config error fails before any training, naming the key and what it accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from aslora.config import ConfigError, load_config, parse_config
from aslora.methods import METHODS

REPO = Path(__file__).resolve().parents[1]


def test_demo_config_is_valid() -> None:
    config = load_config(REPO / "configs" / "demo.toml")
    assert config.data.num_clients == 6
    assert config.data.partition == "dirichlet" and config.data.dirichlet_alpha == 0.5
    assert config.privacy.epsilon == 3.0


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path) -> None:
    assert load_config(path).name


def test_unknown_key_names_the_key_and_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"federation": {"round": 3}})
    message = str(err.value)
    assert "federation.round" in message
    assert "rounds" in message and "clients_per_round" in message


def test_unknown_top_level_section() -> None:
    with pytest.raises(ConfigError, match="unknown key 'trainig'.*federation"):
        parse_config({"trainig": {}})


def test_unknown_method_lists_the_methods() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"method": "fedprox"})
    assert "'method'" in str(err.value)
    for name in METHODS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"federation": {"rounds": 0}}, "federation.rounds"),
        ({"privacy": {"delta": 1.5}}, "privacy.delta"),
        ({"privacy": {"clip": -1}}, "privacy.clip"),
        ({"data": {"partition": "shards"}}, "data.partition"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"optim": {"lr": "fast"}}, "optim.lr"),
        ({"privacy": {"head_clip_share": 1.0}}, "privacy.head_clip_share"),
        ({"privacy": {"head_clip_share": 0.0}}, "privacy.head_clip_share"),
    ],
)
def test_impossible_values_name_their_key(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(raw)


def test_every_error_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"federation": {"rounds": 0, "local_steps": 0}})
    assert "federation.rounds" in str(err.value) and "federation.local_steps" in str(err.value)


def test_more_clients_per_round_than_clients() -> None:
    with pytest.raises(ConfigError, match="clients_per_round=20 exceeds data.num_clients=10"):
        parse_config({"data": {"num_clients": 10}, "federation": {"clients_per_round": 20}})


def test_a_head_clip_share_needs_a_trained_head_and_dp() -> None:
    with pytest.raises(ConfigError, match="head_clip_share.*lora.train_head = false.*remove privacy.head_clip_share"):
        parse_config({"privacy": {"head_clip_share": 0.25}, "lora": {"train_head": False}})
    with pytest.raises(ConfigError, match="head_clip_share.*privacy.enabled = false clips nothing"):
        parse_config({"privacy": {"head_clip_share": 0.25, "enabled": False}})
    assert parse_config({"privacy": {"head_clip_share": 0.25}}).privacy.head_clip_share == 0.25


def test_privacy_needs_a_target() -> None:
    with pytest.raises(ConfigError, match="epsilon.*noise_multiplier"):
        parse_config({"privacy": {"epsilon": None}})


def test_overrides_are_validated() -> None:
    config = load_config(REPO / "tests" / "base.toml")
    assert config.with_overrides({"privacy.epsilon": 1.0}).privacy.epsilon == 1.0
    with pytest.raises(ConfigError, match="privacy.epsilon"):
        config.with_overrides({"privacy.epsilon": -1.0})
    with pytest.raises(ConfigError, match="unknown section 'privacyy' in override 'privacyy.epsilon'"):
        config.with_overrides({"privacyy.epsilon": 1.0})


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nrounds = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize("method", ["fedsvd", "flora", "fedex", "flexlora", "fedsa"])
def test_secure_aggregation_refuses_methods_that_need_each_update(method: str) -> None:
    raw = {"method": method, "federation": {"secure_aggregation": True}, "data": {"holdout_fraction": 0.1}}
    with pytest.raises(ConfigError, match=f"secure_aggregation.*'{method}'.*not a weighted sum.*aslora"):
        parse_config(raw)


@pytest.mark.parametrize("method", ["fedavg", "ffa", "rolora", "aslora"])
def test_secure_aggregation_accepts_linear_methods(method: str) -> None:
    assert parse_config({"method": method, "federation": {"secure_aggregation": True}}).federation.secure_aggregation


def test_secure_aggregation_refuses_stragglers_and_single_clients() -> None:
    with pytest.raises(ConfigError, match="stragglers.*secure sum"):
        parse_config({"method": "aslora", "federation": {"secure_aggregation": True, "stragglers": 0.2}})
    with pytest.raises(ConfigError, match="clients_per_round >= 2"):
        parse_config({"method": "aslora", "federation": {"secure_aggregation": True, "clients_per_round": 1}})


def test_per_method_settings_apply_to_their_method_only_and_flags_win() -> None:
    """Each baseline at its own tuned lr: [per_method.<m>] over the shared settings, then the flags."""
    config = parse_config({"method": "ffa", "optim": {"lr": 8.0}, "per_method": {"aslora": {"optim": {"lr": 4.0}}}})
    assert config.optim.lr == 8.0  # as loaded, nothing is applied yet
    aslora = config.for_method("aslora")
    assert aslora.method == "aslora" and aslora.optim.lr == 4.0 and aslora.per_method == {}
    assert config.for_method("ffa").optim.lr == 8.0  # switching starts from the file's settings
    assert config.for_method("aslora", {"optim.lr": 2.0}).optim.lr == 2.0


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"fedavgg": {"optim": {"lr": 1.0}}}, "per_method.fedavgg: no such method"),
        ({"ffa": {"seed": 3}}, "per_method.ffa: seed cannot differ by method"),
        ({"ffa": {"optim": {"lrr": 1.0}}}, "per_method.ffa: .*optim.lrr"),
        ({"ffa": {"optim": {"lr": -1.0}}}, "per_method.ffa: .*optim.lr"),
        ({"ffa": {"optimm": {"lr": 1.0}}}, "per_method.ffa: optimm cannot differ by method"),
    ],
)
def test_a_bad_per_method_table_fails_at_load_naming_it(table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"per_method": table})


def test_a_run_refuses_a_config_whose_per_method_tables_are_not_applied() -> None:
    from aslora.experiment import prepare

    config = parse_config({"per_method": {"ffa": {"optim": {"lr": 1.0}}}})
    with pytest.raises(ConfigError, match="for_method"):
        prepare(config)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"federation": {"rounds": True}}, "federation.rounds"),  # a bool is not an int
        ({"privacy": {"enabled": "yes"}}, "privacy.enabled"),  # nor a string a bool
        ({"seed": 1.0}, "seed"),
        ({"lora": {"target_modules": ["query", 3]}}, "lora.target_modules"),
        ({"privacy": {"epsilon": float("inf")}}, "privacy.epsilon"),
        ({"optim": {"lr": float("inf")}}, "optim.lr"),
        ({"privacy": {"clip": float("nan")}}, "privacy.clip"),
    ],
)
def test_nothing_is_coerced_and_every_number_is_finite(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}"):
        parse_config(raw)
    assert parse_config({"optim": {"lr": 1}}).optim.lr == 1.0  # an int where a float goes is exact, so it stays
