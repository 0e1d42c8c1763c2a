import dataclasses
from typing import Literal

import pytest

from pocketrlhf.config import ConfigError, option, parse_args, save_config, from_dict, read_yaml


@dataclasses.dataclass
class Demo:
    learning_rate: float = option(1e-4)
    batch_size: int = option(8)
    packing: bool = option(True)
    quantization: Literal["none", "8bit", "4bit"] = option("none")
    tags: list[str] = option([])
    name: str = option("x")


def test_precedence_defaults_yaml_flags(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("learning_rate: 3.0e-4\nbatch_size: 4\nquantization: 4bit\n")
    cfg = parse_args(Demo, ["--config", str(cfg_file), "--batch-size", "2"])
    assert cfg.learning_rate == 3e-4  # YAML beats default
    assert cfg.batch_size == 2  # flag beats YAML
    assert cfg.quantization == "4bit"
    assert cfg.packing is True  # default kept
    assert parse_args(Demo, ["--batch_size=16"]).batch_size == 16


def test_unknown_keys_name_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option --lerning-rate \(did you mean --learning-rate\?\)"):
        parse_args(Demo, ["--lerning-rate", "1"])
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("bach_size: 4\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key 'bach_size' \(did you mean 'batch_size'\?\)"):
        parse_args(Demo, ["--config", str(cfg_file)])


def test_values_are_checked_against_types():
    with pytest.raises(ConfigError, match="--batch-size: expected an integer, got 'four'"):
        parse_args(Demo, ["--batch-size", "four"])
    with pytest.raises(ConfigError, match="'3bit' is not one of none, 8bit, 4bit"):
        parse_args(Demo, ["--quantization", "3bit"])
    with pytest.raises(ConfigError, match="expected true or false"):
        parse_args(Demo, ["--packing=maybe"])
    with pytest.raises(ConfigError, match="needs a value"):
        parse_args(Demo, ["--name"])


def test_booleans_lists_and_numbers():
    assert parse_args(Demo, ["--no-packing"]).packing is False
    assert parse_args(Demo, ["--packing", "false"]).packing is False
    assert parse_args(Demo, ["--packing"]).packing is True
    assert parse_args(Demo, ["--tags", "a, b"]).tags == ["a", "b"]
    assert parse_args(Demo, ["--batch-size", "1e2"]).batch_size == 100


def test_resolved_config_round_trips(tmp_path):
    cfg = parse_args(Demo, ["--learning-rate", "5e-5", "--tags", "x"])
    save_config(cfg, tmp_path / "config.yaml")
    assert from_dict(Demo, read_yaml(tmp_path / "config.yaml")) == cfg


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: 4\nname: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml:"):
        parse_args(Demo, ["--config", str(bad)])
