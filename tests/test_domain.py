"""The real-proxy domain on the real simulator: it differs from the sim, yet the motion planner solves it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from policy_runtime.episodes import load_dataset
from sim_trainer.cli import main
from sim_trainer.data.demos import generate_demos, plan_and_convert
from sim_trainer.envs.adapter import adapt
from sim_trainer.envs.domain import DomainShift, load_domain
from sim_trainer.envs.make import PolicyObsEnv, make_maniskill_env
from sim_trainer.envs.spec import EnvConfig
from sim_trainer.errors import UserError

PRESET = Path(__file__).resolve().parent.parent / "configs" / "domain_real_proxy.yaml"


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "domain.yaml"
    path.write_text(text)
    return str(path)


def test_preset_file_is_the_builtin_domain_and_survives_the_config_round_trip():
    assert load_domain(str(PRESET)) == load_domain("real_proxy") == DomainShift()
    assert DomainShift.from_dict(DomainShift().to_dict()) == DomainShift()
    cfg = EnvConfig(task="PushCube-v1", domain="real_proxy")
    assert EnvConfig.from_dict(cfg.to_dict()).domain == "real_proxy"  # what spawned CPU workers rebuild
    assert EnvConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "domain"}).domain is None


@pytest.mark.parametrize("text, message", [
    ("frictionscale: 1.2\n", "unknown key(s) frictionscale"),
    ("friction_scale: -1\n", "friction_scale must be in (0, 5]"),
    ("action_latency_steps: 2\n", "action_latency_steps must be 0 or 1"),
    ("light_color: [1, 1]\n", "light_color must be a list of 3 numbers"),
    ("object_mass_scale: heavy\n", "object_mass_scale must be a finite number"),
    ("camera_position_offset: [0.2, 0, 0]\n", "camera_position_offset must stay within 0.05 m"),
    ("- 1\n", "must be a mapping"),
])
def test_bad_domain_yaml_is_a_one_line_user_error(tmp_path, capsys, text, message):
    path = _yaml(tmp_path, text)
    with pytest.raises(UserError) as err:
        EnvConfig(task="PushCube-v1", domain=path).validate()
    assert message in str(err.value) and "\n" not in str(err.value)
    assert main(["demos", "--task", "PushCube-v1", "--domain", path, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_missing_domain_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read domain"):
        EnvConfig(domain=str(tmp_path / "nope.yaml")).validate()


def _frame(env) -> torch.Tensor:
    raw, _ = env.reset(seed=3)
    return raw["sensor_data"]["base_camera"]["rgb"][0].float()


def _rgb_env(domain: str | None):
    return make_maniskill_env(EnvConfig(task="PushCube-v1", obs_mode="rgb", image_size=32, domain=domain))


@pytest.fixture(scope="module")
def sim_frame():
    """A sim frame rendered before any shifted env exists; the env stays open because SAPIEN tears its renderer
    down with the last env and building it again costs ~20 s on a CPU."""
    env = _rgb_env(None)
    yield _frame(env)
    env.close()


def test_real_proxy_frames_differ_and_leave_the_sim_untouched(sim_frame):
    proxy_env = _rgb_env("real_proxy")
    proxy = _frame(proxy_env)
    proxy_env.close()
    sim_env = _rgb_env(None)
    sim_again = _frame(sim_env)
    sim_env.close()
    assert (sim_frame - proxy).abs().mean() > 10  # lighting, colours and camera; pixel noise alone gives ~2.4
    assert torch.equal(sim_frame, sim_again)  # tinted textures and materials do not leak into later envs


@pytest.mark.usefixtures("sim_frame")
def test_observation_noise_is_present_and_seeded():
    env = PolicyObsEnv(EnvConfig(task="PushCube-v1", obs_mode="rgb", image_size=32, domain="real_proxy"))
    try:
        first, _ = env.reset(seed=1)
        state_noise, image_noise = [], []
        obs = first
        for _ in range(6):
            clean = adapt(env.env.unwrapped.get_obs(), 32, True)  # the same state without the noise
            state_noise.append(torch.as_tensor(obs["state"]) - clean["state"][0])
            image_noise.append(torch.as_tensor(obs["images"]["base_camera"]).float()
                               - clean["images"]["base_camera"][0].float())
            obs = env.step(torch.zeros(8).numpy())[0]
        assert 0.0008 < torch.cat(state_noise).std() < 0.0012  # state_noise_std 0.001
        assert 2.5 < torch.stack(image_noise).std() < 3.5  # image_noise_std 3
        again, _ = env.reset(seed=1)
        other, _ = env.reset(seed=2)
        assert (again["state"] == first["state"]).all() and (again["images"]["base_camera"]
                                                              == first["images"]["base_camera"]).all()
        assert not (other["state"] == first["state"]).all()
    finally:
        env.close()


@pytest.fixture(scope="module")
def sim_push_actions() -> torch.Tensor:
    """The joint-delta actions of one motion-planned PushCube demo in the sim domain (seed 0)."""
    result = plan_and_convert(EnvConfig(task="PushCube-v1", obs_mode="state"), 0)
    assert result.ok
    return torch.as_tensor(result.episode.actions)


def _replay(domain: str | None, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Cube positions and true robot joint positions after each action, and the final success."""
    env = make_maniskill_env(EnvConfig(task="PushCube-v1", obs_mode="state", domain=domain))
    try:
        env.reset(seed=0)
        cube, qpos = [], []
        for a in actions:
            info = env.step(a[None])[4]
            cube.append(env.unwrapped.obj.pose.p[0].clone())
            qpos.append(env.unwrapped.agent.robot.get_qpos()[0].clone())
        return torch.stack(cube), torch.stack(qpos), bool(info["success"][0])
    finally:
        env.close()


def test_shifted_physics_change_the_cube_trajectory(sim_push_actions, tmp_path):
    physics_only = _yaml(tmp_path, "action_latency_steps: 0\nstate_noise_std: 0\nimage_noise_std: 0\n")
    sim, _, sim_success = _replay(None, sim_push_actions)
    sim_again, _, _ = _replay(None, sim_push_actions)
    shifted, _, _ = _replay(physics_only, sim_push_actions)
    proxy, _, _ = _replay("real_proxy", sim_push_actions)
    assert sim_success and torch.equal(sim, sim_again)  # the replay is deterministic
    assert (sim - shifted).norm(dim=1).max() > 1e-3  # friction x1.3 and a 1.5x heavier cube, with no latency
    assert (sim - proxy).norm(dim=1).max() > 5e-3
    env = make_maniskill_env(EnvConfig(task="PushCube-v1", obs_mode="state", domain=physics_only))
    try:
        assert env.unwrapped.obj.mass[0].item() == pytest.approx(1.5 * 0.064, rel=1e-5)
    finally:
        env.close()


def test_latency_delays_every_action_by_one_step(sim_push_actions, tmp_path):
    no_latency = _yaml(tmp_path, "action_latency_steps: 0\n")  # otherwise the real-proxy domain
    sent = sim_push_actions[:20]
    executed = torch.cat([sent[:1], sent[:-1]])  # the first action also fills the first step
    _, with_latency, _ = _replay("real_proxy", sent)
    _, delayed_by_hand, _ = _replay(no_latency, executed)
    _, undelayed, _ = _replay(no_latency, sent)
    assert torch.equal(with_latency, delayed_by_hand)
    assert (with_latency - undelayed).abs().max() > 1e-3


@pytest.mark.parametrize("task", ["PushCube-v1", "PickCube-v1"])
def test_motion_planner_solves_the_real_proxy_domain(tmp_path, task):
    counts = generate_demos(EnvConfig(task=task, obs_mode="state", domain="real_proxy"), 2, tmp_path / "rp")
    episodes = load_dataset(tmp_path / "rp")
    assert counts["kept"] == 2 and counts["attempts"] <= 4
    assert all(ep.success and ep.source == "real-proxy" for ep in episodes)
    assert episodes[0].provenance["domain"] == DomainShift().to_dict()
