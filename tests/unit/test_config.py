"""Config loading: defaults, presets, and errors that name the key and the file."""

from pathlib import Path

import pytest

from vistr.config import Config, ConfigError, from_dict, load_config, save_config

PRESETS = ["paper_r50", "paper_r101", "tiny_cpu"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_derive_queries(name: str) -> None:
    cfg = load_config(name)
    assert cfg.model.num_queries == cfg.model.num_slots * cfg.model.num_frames


def test_paper_presets_match_paper_settings() -> None:
    r50, r101 = load_config("paper_r50"), load_config("paper_r101")
    for cfg in (r50, r101):
        m, t = cfg.model, cfg.train
        assert (m.num_frames, m.num_slots, m.num_queries) == (36, 10, 360)
        assert (m.hidden_dim, m.enc_layers, m.dec_layers, m.nheads) == (384, 6, 6, 8)
        assert (t.lr, t.lr_backbone, t.epochs, t.lr_drop) == (1e-4, 1e-5, 18, 12)
        assert (cfg.data.min_size, cfg.data.max_size) == (300, 540)
    assert (r50.model.backbone, r101.model.backbone) == ("resnet50", "resnet101")


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hiden_dim: 384\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.hiden_dim"):
        load_config(path)


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("modle: {}\n")
    with pytest.raises(ConfigError, match="modle"):
        load_config(path)


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("train:\n  lr: fast\n", "train.lr"),
        ("model:\n  num_frames: 3.5\n", "model.num_frames"),
        ("model:\n  position_encoding: 1\n", "model.position_encoding"),
        ("model:\n  query_level: pixel\n", "model.query_level"),
        ("data:\n  multiscale: 300\n", "data.multiscale"),
    ],
)
def test_wrong_types_name_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path)


def test_hidden_dim_must_split_in_three() -> None:
    with pytest.raises(ConfigError, match="divisible by 3"):
        from_dict({"model": {"hidden_dim": 256}})


def test_int_accepted_for_float_and_defaults_fill_the_rest() -> None:
    cfg = from_dict({"train": {"lr": 1}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.lr_backbone == Config().train.lr_backbone


def test_save_load_round_trip_and_hash(tmp_path: Path) -> None:
    cfg = load_config("tiny_cpu", overrides={"train.lr": 5e-4, "model.query_level": "instance"})
    assert cfg.train.lr == 5e-4 and cfg.model.query_level == "instance"
    again = load_config(save_config(cfg, tmp_path / "cfg.yaml"))
    assert again == cfg
    assert again.hash() == cfg.hash()
    assert cfg.with_overrides({"train.lr": 1e-3}).hash() != cfg.hash()
    assert cfg.with_overrides({"train.lr": 1e-3}).hash(("model",)) == cfg.hash(("model",))


def test_override_of_unknown_key_fails() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr' \(did you mean train\.lr,"):
        Config().with_overrides({"train.lrr": 1.0})


def test_a_bad_override_is_blamed_on_the_override_not_the_file() -> None:
    with pytest.raises(ConfigError, match=r"tiny_cpu\.yaml with overrides train\.lr='abc': train\.lr must be a number"):
        load_config("tiny_cpu", {"train.lr": "abc"})


def test_flat_keys_are_dotted() -> None:
    flat = Config().flat()
    assert flat["model.hidden_dim"] == 384 and flat["loss.eos_coef"] == 0.1


def test_missing_preset_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="tiny_cpu"):
        load_config("no_such_preset")


def test_exponent_without_dot_is_a_number(tmp_path: Path) -> None:
    # YAML 1.1 reads "1e-4" as a string; a config or --set train.lr=1e-4 must still mean 0.0001.
    from vistr.config import parse_overrides

    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1e-4\n  lr_backbone: 5E-6\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.lr_backbone) == (1e-4, 5e-6)
    assert load_config("tiny_cpu", parse_overrides(["train.lr=2e-3"])).train.lr == 2e-3
    with pytest.raises(ConfigError, match="train.lr must be a number"):
        load_config("tiny_cpu", parse_overrides(["train.lr=1e-4x"]))
