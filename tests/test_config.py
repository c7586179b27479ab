from pathlib import Path

import pytest

from rlhf_lib.config import PRESETS, ConfigError, load_preset


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads(name):
    cfg = load_preset(name)
    assert cfg.preset == name
    assert cfg.labelers.k_min >= 2 and cfg.labelers.k_max <= 9


def test_paper_defaults_where_the_paper_is_explicit():
    cfg = load_preset("tiny")
    assert cfg.ppo.kl_beta == 0.02
    assert cfg.ppo.gamma == 1.0 and cfg.ppo.gae_lambda == 0.95
    assert cfg.sft.min_lr_ratio == 0.1 and (cfg.sft.adam_beta1, cfg.sft.adam_beta2) == (0.9, 0.95)


def test_unknown_key_names_key_file_and_allowed(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[ppo]\nkl_bta = 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_preset(bad)
    message = str(err.value)
    assert "bad.toml" in message and "ppo.kl_bta" in message and "kl_beta" in message


def test_bad_value_names_allowed_values(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\ndtype = "fp8"\n')
    with pytest.raises(ConfigError, match=r"model\.dtype.*'float32'"):
        load_preset(bad)


def test_out_of_range_and_wrong_type_rejected():
    with pytest.raises(ConfigError, match=r"ppo\.clip_range.*\[0\.0, 1\.0\]"):
        load_preset("micro", {"ppo.clip_range": 3.0})
    with pytest.raises(ConfigError, match=r"sft\.epochs.*int"):
        load_preset("micro", {"sft.epochs": "two"})
    with pytest.raises(ConfigError, match="k_min"):
        load_preset("micro", {"labelers.k_min": 8, "labelers.k_max": 4})


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="micro"):
        load_preset("huge")


def test_fingerprint_changes_only_downstream():
    base = load_preset("micro")
    changed = load_preset("micro", {"ppo.kl_beta": 0.05})
    assert base.fingerprint("sft") == changed.fingerprint("sft")
    assert base.fingerprint("reward") == changed.fingerprint("reward")
    assert base.fingerprint("ppo") != changed.fingerprint("ppo")
    assert base.fingerprint("analysis") != changed.fingerprint("analysis")


def test_a_table_override_changes_its_knobs_and_keeps_the_rest_of_the_preset():
    preset = load_preset("tiny")
    nested = load_preset("tiny", {"ppo": {"learning_rate": 1e-3}, "seed": 3})
    dotted = load_preset("tiny", {"ppo.learning_rate": 1e-3, "seed": 3})
    assert nested == dotted
    assert nested.ppo.learning_rate == 1e-3 and nested.seed == 3
    for name in ("rollout_batch", "minibatch", "ppo_epochs", "iterations"):
        assert getattr(nested.ppo, name) == getattr(preset.ppo, name), name


@pytest.mark.parametrize("key, bad", [
    ("reward.temperatures", []), ("reward.temperatures", [0.0]), ("reward.temperatures", [True]),
    ("reward.feature_layers", [1.5]), ("reward.head_weight_decays", [-1.0]), ("labelers.labelers_per_prompt", 4),
])
def test_reward_lists_and_labelers_per_prompt_are_checked(key, bad):
    with pytest.raises(ConfigError, match=key.split(".")[1]):
        load_preset("micro", {key: bad})


@pytest.mark.parametrize("key, bad", [
    ("ppo.max_kl", float("nan")), ("sft.learning_rate", float("nan")), ("ppo.kl_beta", float("inf")),
    ("labelers.noise_scale", float("-inf")), ("reward.temperatures", [1.0, float("nan")]),
    ("reward.head_weight_decays", [0.1, float("inf")]), ("sft.epochs", float("inf")),
])
def test_nan_and_infinity_are_rejected_naming_key_and_file(key, bad):
    with pytest.raises(ConfigError, match=rf"micro\.toml: bad value .* for '{key}': NaN and infinity are not allowed"):
        load_preset("micro", {key: bad})


def test_nan_in_a_preset_file_is_rejected(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[ppo]\nmax_kl = nan\n\n[reward]\nfeature_layers = [0.5, inf]\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: .*'ppo\.max_kl': NaN"):
        load_preset(bad)
    bad.write_text("[reward]\nfeature_layers = [0.5, inf]\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: .*'reward\.feature_layers': NaN"):
        load_preset(bad)
