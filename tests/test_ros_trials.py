"""Trial plan, results journal (crash recovery, redo), summary, camera_info YAML, teleop jogs, trial recording."""

from __future__ import annotations

import json

import numpy as np
import pytest
from vla_ros.trials import Journal, PlanError, load_plan, next_plan_index, summarize, write_summary

from calibration.io import camera_yaml, read_camera_yaml, write_yaml
from policy_runtime.errors import UserError
from tests.ros_fixtures import ROOT  # noqa: F401  (puts vla_ros on the path)


def test_plan_forms_and_errors(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text("instruction: push\ncount: 3\nseed_start: 7\n")
    assert [(t.index, t.seed, t.instruction) for t in load_plan(p)] == [(0, 7, "push"), (1, 8, "push"), (2, 9, "push")]
    p.write_text("instruction: a\ntrials:\n  - {seed: 5}\n  - {seed: 6, instruction: b}\n")
    assert [(t.seed, t.instruction) for t in load_plan(p)] == [(5, "a"), (6, "b")]
    for bad, msg in (("count: 0\n", "count"), ("trials: []\n", "non-empty"), ("trials:\n  - {seed: x}\n", "seed"),
                     ("- 1\n", "mapping"), ("count: [\n", "not valid YAML at line 2")):
        p.write_text(bad)
        with pytest.raises(PlanError, match=msg):
            load_plan(p)


def test_journal_recovers_a_trial_killed_mid_run(tmp_path):
    path = tmp_path / "journal.jsonl"
    j = Journal(path)
    j.append({"event": "start", "trial": 0, "plan_index": 0, "seed": 1})
    j.append({"event": "end", "trial": 0, "plan_index": 0, "seed": 1, "outcome": "success"})
    j.append({"event": "start", "trial": 1, "plan_index": 1, "seed": 2})
    with open(path, "ab") as f:  # the crash hit in the middle of writing the next line
        f.write(b'{"event": "end", "tri')
    j2 = Journal(path)
    assert [e["event"] for e in j2.events] == ["start", "end", "start"] and j2.torn_lines == 1
    (rec,) = j2.recover()
    assert rec["trial"] == 1 and rec["outcome"] == "aborted" and "restarted" in rec["reason"]
    assert Journal(path).open_trials() == [] and Journal(path).recover() == []
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["outcome"] == "aborted"  # the torn line was closed off, not merged
    assert j2.next_trial_number() == 2


def test_judgements_redo_and_summary(tmp_path):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text("count: 3\n")
    plan = load_plan(plan_file)
    j = Journal(tmp_path / "journal.jsonl")
    for trial, (idx, outcome) in enumerate([(0, "success"), (1, "aborted"), (1, "failure"), (2, "success")]):
        j.append({"event": "start", "trial": trial, "plan_index": idx, "seed": idx})
        j.append({"event": "end", "trial": trial, "plan_index": idx, "seed": idx, "outcome": outcome})
    assert next_plan_index(j, plan) is None
    s = summarize(j, plan)
    assert (s["judged"], s["successes"], s["aborted"]) == (3, 2, 1)
    lo, hi = s["wilson95"]
    assert lo < 2 / 3 < hi
    j.append({"event": "redo", "trial": 3, "plan_index": 2})  # the operator discards the last judgement
    assert next_plan_index(j, plan) == 2 and summarize(j, plan)["judged"] == 2
    write_summary(tmp_path, summarize(j, plan))
    assert json.loads((tmp_path / "summary.json").read_text())["successes"] == 1
    assert "| 1 | 2 | 1 | failure |" in (tmp_path / "summary.md").read_text()


def test_camera_info_yaml_round_trip_and_errors(tmp_path):
    """The camera node reads camera_info files with calibration's reader: R, P and the model survive a round trip."""
    p = tmp_path / "cam.yaml"
    p.write_text("image_width: 640\nimage_height: 480\ncamera_name: wrist\n"
                 "camera_matrix: {rows: 3, cols: 3, data: [600, 0, 320, 0, 600, 240, 0, 0, 1]}\n"
                 "distortion_model: plumb_bob\ndistortion_coefficients: {rows: 1, cols: 5, data: [0.1, 0, 0, 0, 0]}\n"
                 "rectification_matrix: {rows: 3, cols: 3, data: [1, 0, 0, 0, 1, 0, 0, 0, 1]}\n"
                 "projection_matrix: {rows: 3, cols: 4, data: [600, 0, 320, 0, 0, 600, 240, 0, 0, 0, 1, 0]}\n")
    cal = read_camera_yaml(p)
    assert (cal.width, cal.height, cal.name, cal.K[0, 2], cal.dist[0]) == (640, 480, "wrist", 320.0, 0.1)
    cal.P[0, 3] = -36.0  # a stereo right camera's projection: kept as given, not rebuilt from K
    again = read_camera_yaml(write_yaml(tmp_path / "again.yaml", camera_yaml(cal)))
    np.testing.assert_array_equal(again.P, cal.P)
    np.testing.assert_array_equal(again.R, np.eye(3))
    assert again.distortion_model == "plumb_bob"
    p.write_text("image_width: 640\nimage_height: 480\ncamera_matrix: {rows: 3, cols: 3, data: [1, 2]}\n")
    with pytest.raises(UserError, match="camera_matrix"):
        read_camera_yaml(p)


def test_cartesian_jog_moves_the_tcp_along_the_axis():
    from vla_ros.actions import PANDA_ARM, PANDA_FINGERS
    from vla_ros.jog import cartesian_jog, joint_jog
    from vla_ros.robot import RobotModel

    robot = RobotModel()
    q = dict(zip(PANDA_ARM + PANDA_FINGERS, [0.0, 0.39, 0.0, -1.96, 0.0, 2.36, 0.79, 0.04, 0.04], strict=True))
    p0 = robot.base_T_tcp(q)[:3, 3]
    q1 = cartesian_jog(q, PANDA_ARM, np.array([0.0, 0.0, 0.01]), robot.base_T_tcp)
    np.testing.assert_allclose(robot.base_T_tcp(q1)[:3, 3] - p0, [0, 0, 0.01], atol=1e-3)
    assert joint_jog(q, "panda_joint3", 0.1)["panda_joint3"] == pytest.approx(0.1)


def test_recorder_pairs_steps_and_images_into_a_valid_episode(tmp_path):
    from vla_ros.recorder import TrialRecorder

    from policy_runtime.contract import CameraSpec, PolicySpec
    from policy_runtime.episodes import EpisodeWriter, read_episode

    spec = PolicySpec("PushCube-v1", "pd_joint_delta_pos", "rgb", (CameraSpec("base_camera", 4, 4),),
                      (("agent/qpos", 2),), 3, (-1.0,) * 3, (1.0,) * 3, 20.0, "push")
    r = TrialRecorder()
    r.add_step([0, 0.0, 1, 2, 0.1, 0.2, 0.3], 2)  # before start(): ignored
    r.start()
    for step in (5, 6, 7):
        r.add_step([step, step * 0.05, step, step, 0.1, 0.2, 0.3], 2)
        if step != 6:  # step 6 lost its image: dropped from the episode
            r.add_image(f"base_camera#{step}", np.full((4, 4, 3), step, np.uint8))
    r.stop()
    ep = r.episode(spec, "push", True, "sim", {"trial": 1})
    assert len(ep) == 2 and ep.images["base_camera"][1, 0, 0, 0] == 7
    np.testing.assert_allclose(ep.timestamps, [0.0, 0.1])
    path = EpisodeWriter(tmp_path, spec).write(ep)
    assert read_episode(path).success


def test_plan_entry_is_given_up_after_max_aborts(tmp_path):
    from vla_ros.trials import given_up

    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text("count: 2\n")
    plan = load_plan(plan_file)
    j = Journal(tmp_path / "journal.jsonl")
    for trial, reason in enumerate(["policy server: rejected", "policy server: rejected again"]):
        j.append({"event": "start", "trial": trial, "plan_index": 0, "seed": 0})
        j.append({"event": "end", "trial": trial, "plan_index": 0, "seed": 0, "outcome": "aborted", "reason": reason})
    assert next_plan_index(j, plan) == 0 and next_plan_index(j, plan, max_aborts=3) == 0  # retried while allowed
    assert next_plan_index(j, plan, max_aborts=2) == 1 and list(given_up(j, plan, 2)) == [0]
    s = summarize(j, plan, max_aborts=2)
    assert s["given_up"] == [{"plan_index": 0, "seed": 0, "aborts": 2, "last_reason": "policy server: rejected again"}]
    write_summary(tmp_path, s)
    assert "given up after 2 aborts: plan 0 (policy server: rejected again)" in \
        (tmp_path / "summary.md").read_text()
