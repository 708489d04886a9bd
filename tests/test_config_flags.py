"""One way to configure a run: every config field is a preset key and a flag with help, and flags beat presets."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from sim_trainer.cli import build_parser
from sim_trainer.config_flags import config_from_args, flag_name
from sim_trainer.rl.config import RLConfig
from sim_trainer.sft.trainer import SFTConfig

COMMANDS = [("sft", SFTConfig), ("rl", RLConfig)]
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _subparser(command: str) -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[command]


@pytest.mark.parametrize("command,cls", COMMANDS)
def test_every_field_has_a_flag_with_help(command, cls):
    actions = {opt: a for a in _subparser(command)._actions for opt in a.option_strings}
    for f in fields(cls):
        action = actions.get(flag_name(f.name))
        assert action is not None, f"{cls.__name__}.{f.name} has no {flag_name(f.name)}"
        # argparse formats help with %, so a literal % is stored escaped
        assert action.dest == f.name and f.metadata.get("help") and f.metadata["help"].replace("%", "%%") in action.help
    help_text = _subparser(command).format_help()
    assert all(flag_name(f.name) in help_text for f in fields(cls))
    assert "--data2" not in help_text


@pytest.mark.parametrize("command,cls", COMMANDS)
def test_defaults_then_preset_then_flags(command, cls, tmp_path):
    """Both commands: a flag beats the preset, the preset beats the default, a flag left off changes nothing."""
    (tmp_path / "in").mkdir()
    source = {"sft": "data: [" + str(tmp_path / "in") + "]\n", "rl": f"ckpt: {tmp_path / 'in'}\n"}[command]
    preset = tmp_path / "preset.yaml"
    preset.write_text(source + "out: from_preset\nlr: 0.002\nseed: 7\nresume: true\n")
    parse = build_parser().parse_args

    cfg = config_from_args(cls, parse([command, "--config", str(preset), "--lr", "0.005", "--no-resume"]))
    assert (cfg.lr, cfg.seed, cfg.out, cfg.resume) == (0.005, 7, "from_preset", False)
    default = cls()
    assert cfg.eval_every == default.eval_every and cfg.save_every == default.save_every

    cfg = config_from_args(cls, parse([command, "--config", str(preset), "--out", "from_flag"]))
    assert (cfg.lr, cfg.out, cfg.resume) == (0.002, "from_flag", True)


def test_list_flags_repeat_or_take_several_values(tmp_path):
    parse = build_parser().parse_args
    a = parse(["sft", "--data", "a", "--data", "b", "--mix", "0.5", "0.5", "--out", "o"])
    b = parse(["sft", "--data", "a", "b", "--mix", "0.5", "--mix", "0.5", "--out", "o"])
    assert config_from_args(SFTConfig, a) == config_from_args(SFTConfig, b)
    assert config_from_args(SFTConfig, a).data == ["a", "b"]


@pytest.mark.parametrize("preset", sorted(str(p) for p in CONFIGS.glob("[sr][fl]*_*.yaml")))
def test_shipped_presets_load_with_flags_over_them(preset, tmp_path, monkeypatch):
    """Every shipped sft_*/rl_* preset still loads; the flags given replace only their own keys."""
    from policy_runtime.yaml_io import load_yaml_mapping

    if load_yaml_mapping(preset).get("fsdp"):  # a sharded preset loads as one of torchrun's processes
        monkeypatch.setenv("WORLD_SIZE", "2")
    command, cls = ("sft", SFTConfig) if Path(preset).name.startswith("sft_") else ("rl", RLConfig)
    flags = ["--out", str(tmp_path / "run")]
    if command == "rl":  # the preset's checkpoint, GPU backend and GPU-sized env counts need not fit this host
        flags += ["--ckpt", str(tmp_path), "--sim-backend", "physx_cpu", "--num-envs", "2", "--eval-envs", "2"]
    cfg = config_from_args(cls, build_parser().parse_args([command, "--config", preset, *flags]))
    overridden = {"out", "ckpt", "sim_backend", "num_envs", "eval_envs"}
    for key, value in load_yaml_mapping(preset).items():
        if key not in overridden:
            assert getattr(cfg, key) == value, key
    assert cfg.out == str(tmp_path / "run") and (command == "sft" or cfg.num_envs == 2)
