"""rosbag2 recordings -> episodes of the project's format (`sim-trainer dataset import-rosbag`).

Two kinds of bag:
- the eval manager's trial bags (no topic map): every executed step's record (`/vla/policy/step`: step, capture
  stamp, state, action) is paired by step number with the image the policy saw (`/vla/policy/obs_image`,
  frame_id "<camera>#<step>"), exactly as the eval manager builds its own episode (over the steps its `end`
  event names: a record still in flight when the trial ended is not part of it); the policy's contract
  (`/vla/policy/spec`) gives the spec, the trial's journal events (`/vla/eval/events`) the instruction and outcome.
  Aborted or unfinished trials are skipped (the eval manager keeps no episode of them either).
- any other recording, with a topic map (YAML) naming the image, state and action topics: the streams are
  sampled at `control_hz` on the bag's receive times; at each tick the newest image and state at or before it
  form the observation, and the newest action command before the next tick is the action taken after it.

Read with `rosbags` (no ROS 2 install needed); every input problem is one line (UserError).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from policy_runtime.contract import EPISODE_SOURCES, CameraSpec, PolicySpec
from policy_runtime.episodes import Episode, EpisodeWriter
from policy_runtime.errors import UserError
from policy_runtime.protocol import Contract, ProtocolError
from policy_runtime.yaml_io import load_yaml_mapping

STEP, OBS_IMAGE, SPEC, EVENTS = "/vla/policy/step", "/vla/policy/obs_image", "/vla/policy/spec", "/vla/eval/events"
TRIAL_TOPICS = (STEP, OBS_IMAGE, SPEC, EVENTS)
IMAGE_ENCODINGS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4}
MAP_KEYS = {"cameras", "state", "action", "control_hz", "instruction", "task", "control_mode", "source", "success",
            "action_low", "action_high"}


def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def read_bag(path: Path, wanted: set[str]) -> dict[str, list[tuple[int, object]]]:
    """topic -> [(receive time ns, message)] in time order, for every topic of the bag; only the `wanted` topics'
    messages are read (a long recording's other cameras are never decoded)."""
    from rosbags.rosbag2 import Reader

    if not path.exists():
        raise UserError(f"bag {path} does not exist")
    if not (path / "metadata.yaml").is_file():
        raise UserError(f"{path} is not a rosbag2 directory (no metadata.yaml)")
    store = _typestore()
    out: dict[str, list[tuple[int, object]]] = {}
    try:
        with Reader(path) as reader:
            out = {con.topic: [] for con in reader.connections}
            read = [con for con in reader.connections if con.topic in wanted and con.msgtype in store.types]
            for con, stamp, raw in reader.messages(connections=read) if read else ():
                out[con.topic].append((stamp, store.deserialize_cdr(raw, con.msgtype)))
    except UserError:
        raise
    except Exception as e:  # rosbags raises its own error types for every kind of damage
        raise UserError(f"cannot read bag {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return out


def image_rgb(msg) -> np.ndarray:
    """sensor_msgs/Image (as rosbags decodes it) -> HxWx3 uint8 RGB."""
    if msg.encoding not in IMAGE_ENCODINGS:
        raise UserError(f"unsupported image encoding {msg.encoding!r} (rgb8, bgr8, rgba8, bgra8)")
    c = IMAGE_ENCODINGS[msg.encoding]
    a = np.asarray(msg.data, np.uint8).reshape(msg.height, msg.step)[:, :msg.width * c]
    a = a.reshape(msg.height, msg.width, c)[:, :, :3]
    return a[:, :, ::-1].copy() if msg.encoding.startswith("bgr") else a.copy()


# ----- the eval manager's bags ----------------------------------------------------------------------------------
def trial_episode(path: Path, msgs: dict) -> tuple[PolicySpec, Episode] | str:
    """The trial's episode with its spec, or why the bag holds none."""
    missing = [t for t in TRIAL_TOPICS if not msgs.get(t)]
    if missing:
        raise UserError(f"bag {path} has no {', '.join(missing)}: not an eval manager trial; give --topic-map")
    try:
        spec = Contract.from_wire(json.loads(msgs[SPEC][-1][1].data)).policy_spec()
    except (ValueError, ProtocolError) as e:
        raise UserError(f"bag {path}: unreadable policy contract on {SPEC} ({e})") from None
    events = [json.loads(m.data) for _, m in msgs[EVENTS]]
    start = next((e for e in events if e.get("event") == "start"), None)
    end = next((e for e in events if e.get("event") == "end"), None)
    rec = next((e for e in events if e.get("event") == "recording"), {})
    if start is None or end is None:
        return "the trial has no end (the recording was cut short)"
    if end["outcome"] not in ("success", "failure"):
        return f"the trial was {end['outcome']} ({end.get('reason')})"
    steps: dict[int, tuple[float, np.ndarray, np.ndarray]] = {}
    for _, m in msgs[STEP]:
        dims = {d.label: d.size for d in m.layout.dim}
        data, n = np.asarray(m.data, np.float64), int(dims.get("state", 0))
        steps[int(data[0])] = (float(data[1]), data[2:2 + n].astype(np.float32), data[2 + n:].astype(np.float32))
    images = {}
    for _, m in msgs[OBS_IMAGE]:
        cam, _, step = m.header.frame_id.rpartition("#")
        if cam and step.isdigit():
            images[(cam, int(step))] = image_rgb(m)
    cams = [c.name for c in spec.cameras]
    first, last = end.get("episode_steps") or (-np.inf, np.inf)  # the steps the eval manager's episode kept
    order = [s for s in sorted(steps) if first <= s <= last and all((c, s) in images for c in cams)]
    if not order:
        return "no step has every camera's image"
    stamps = np.asarray([steps[s][0] for s in order], np.float64)
    ep = Episode(state=np.stack([steps[s][1] for s in order]), actions=np.stack([steps[s][2] for s in order]),
                 images={c: np.stack([images[(c, s)] for s in order]) for c in cams}, instruction=start["instruction"],
                 success=end["outcome"] == "success", control_hz=spec.control_hz,
                 source=rec.get("episode_source", "real"), task=spec.task, control_mode=spec.control_mode,
                 state_layout=spec.state_layout, timestamps=stamps - stamps[0],
                 provenance={"trial": start["trial"], "plan_index": start["plan_index"], "seed": start["seed"],
                             "reason": end.get("reason"), "rosbag": str(path)})
    return spec, ep


# ----- a user's own recording, with a topic map -----------------------------------------------------------------
@dataclass(frozen=True)
class TopicMap:
    cameras: dict[str, str]         # camera name -> sensor_msgs/Image topic
    state_topic: str                # sensor_msgs/JointState
    state_joints: tuple[str, ...]   # the state vector: these joints' positions, in this order
    action_topic: str               # JointState, JointTrajectory (last point) or Float64MultiArray
    action_joints: tuple[str, ...]  # for JointState/JointTrajectory; empty: Float64MultiArray data as is
    control_hz: float
    instruction: str
    task: str
    control_mode: str
    source: str
    success: bool
    action_low: tuple[float, ...] | None
    action_high: tuple[float, ...] | None


def load_topic_map(path: str | Path) -> TopicMap:
    d = load_yaml_mapping(path, "topic map")
    unknown = sorted(set(d) - MAP_KEYS)
    if unknown:
        raise UserError(f"topic map {path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(MAP_KEYS))})")
    cams, state, action = d.get("cameras"), d.get("state"), d.get("action")
    if not isinstance(cams, dict) or not cams or not all(isinstance(v, str) for v in cams.values()):
        raise UserError(f"topic map {path}: `cameras` must map camera names to image topics")
    for key, block in (("state", state), ("action", action)):
        if not isinstance(block, dict) or not isinstance(block.get("topic"), str):
            raise UserError(f"topic map {path}: `{key}` needs a `topic` (and `joints`)")
    if not isinstance(state.get("joints"), list) or not state["joints"]:
        raise UserError(f"topic map {path}: `state.joints` must list the joints of the state vector")
    hz = d.get("control_hz")
    if isinstance(hz, bool) or not isinstance(hz, (int, float)) or not 0 < hz <= 1000:
        raise UserError(f"topic map {path}: `control_hz` must be a number in (0, 1000], got {hz!r}")
    source = d.get("source", "real")
    if source not in EPISODE_SOURCES:
        raise UserError(f"topic map {path}: `source` must be one of {EPISODE_SOURCES}, got {source!r}")
    bounds = [d.get(k) for k in ("action_low", "action_high")]
    if (bounds[0] is None) != (bounds[1] is None) or any(b is not None and not isinstance(b, list) for b in bounds):
        raise UserError(f"topic map {path}: give both `action_low` and `action_high` as lists, or neither")
    return TopicMap({str(k): v for k, v in cams.items()}, state["topic"], tuple(map(str, state["joints"])),
                    action["topic"], tuple(map(str, action.get("joints") or ())), float(hz),
                    str(d.get("instruction", "")), str(d.get("task", "custom")),
                    str(d.get("control_mode", "pd_joint_pos")), source, bool(d.get("success", True)),
                    *(tuple(map(float, b)) if b is not None else None for b in bounds))


def _by_name(names, values, joints: tuple[str, ...], what: str) -> np.ndarray:
    table = dict(zip(names, values, strict=False))
    missing = [j for j in joints if j not in table]
    if missing:
        raise UserError(f"{what} has no joint(s) {', '.join(missing)} (it has {', '.join(names)})")
    return np.asarray([table[j] for j in joints], np.float32)


def _action_vector(msg, joints: tuple[str, ...], what: str) -> np.ndarray:
    if hasattr(msg, "points"):  # trajectory_msgs/JointTrajectory: the last point is the target
        if not len(msg.points):
            raise UserError(f"{what}: a trajectory without points")
        return _by_name(msg.joint_names, msg.points[-1].positions, joints, what)
    if hasattr(msg, "position"):  # sensor_msgs/JointState
        return _by_name(msg.name, msg.position, joints, what)
    if hasattr(msg, "data") and not joints:  # std_msgs/Float64MultiArray
        return np.asarray(msg.data, np.float32)
    raise UserError(f"{what}: a {type(msg).__name__} cannot be an action (JointState, JointTrajectory or "
                    "Float64MultiArray without `joints`)")


def mapped_episode(path: Path, msgs: dict, tm: TopicMap) -> Episode | str:
    """Sample the mapped streams at control_hz on the receive times (see the module docstring)."""
    streams = {**{f"camera {c}": t for c, t in tm.cameras.items()}, "state": tm.state_topic, "action": tm.action_topic}
    missing = [f"{what} topic {topic}" for what, topic in streams.items() if not msgs.get(topic)]
    if missing:
        raise UserError(f"bag {path} has no {', '.join(missing)} (it has {', '.join(sorted(msgs))})")
    times = {t: np.asarray([s for s, _ in msgs[t]], np.int64) for t in streams.values()}
    dt = int(round(1e9 / tm.control_hz))
    t0, t_end = max(int(v[0]) for v in times.values()), max(int(v[-1]) for v in times.values())
    ticks = np.arange(t0, t_end + 1, dt, dtype=np.int64)
    if not len(ticks):
        return "the streams never overlap"

    def newest(topic: str, t: np.ndarray) -> np.ndarray:
        return np.searchsorted(times[topic], t, side="right") - 1

    state = np.stack([_by_name(m.name, m.position, tm.state_joints, f"bag {path}, {tm.state_topic}")
                      for m in (msgs[tm.state_topic][i][1] for i in newest(tm.state_topic, ticks))])
    act_idx = newest(tm.action_topic, ticks + dt - 1)
    actions = np.stack([_action_vector(msgs[tm.action_topic][i][1], tm.action_joints, f"bag {path}, {tm.action_topic}")
                        for i in act_idx])
    images = {}
    for cam, topic in tm.cameras.items():
        frames = [image_rgb(msgs[topic][i][1]) for i in newest(topic, ticks)]
        if len({f.shape for f in frames}) > 1:
            raise UserError(f"bag {path}: camera {cam} ({topic}) changes image size during the recording")
        images[cam] = np.stack(frames)
    return Episode(state=state, actions=actions, images=images, instruction=tm.instruction, success=tm.success,
                   control_hz=tm.control_hz, source=tm.source, task=tm.task, control_mode=tm.control_mode,
                   state_layout=(("agent/qpos", len(tm.state_joints)),), timestamps=(ticks - ticks[0]) * 1e-9,
                   provenance={"rosbag": str(path)})


def mapped_spec(tm: TopicMap, episodes: list[Episode]) -> PolicySpec:
    """A spec for mapped episodes: action bounds from the map, else the recorded range."""
    first = episodes[0]
    acts = np.concatenate([e.actions for e in episodes])
    low = tm.action_low or tuple(float(x) for x in acts.min(0))
    high = tm.action_high or tuple(float(x) for x in acts.max(0))
    if len(low) != acts.shape[1] or len(high) != acts.shape[1]:
        raise UserError(f"topic map: action_low/high need {acts.shape[1]} values (the action's size)")
    return PolicySpec(tm.task, tm.control_mode, "rgb",
                      tuple(CameraSpec(c, int(f.shape[1]), int(f.shape[2])) for c, f in first.images.items()),
                      first.state_layout, int(acts.shape[1]), low, high, tm.control_hz, tm.instruction)


# ----- the command --------------------------------------------------------------------------------------------------
def import_rosbags(bags: list[str | Path], out: str | Path, topic_map: str | Path | None = None,
                   force: bool = False) -> dict:
    """Read every bag first (nothing is written if one is bad), then write the dataset; returns counts and skips."""
    from sim_trainer.run_dir import DATASET_ENTRIES, RunDir

    tm = load_topic_map(topic_map) if topic_map else None
    specs, episodes, skipped = [], [], []
    for bag in map(Path, bags):
        msgs = read_bag(bag, {tm.state_topic, tm.action_topic, *tm.cameras.values()} if tm else set(TRIAL_TOPICS))
        got = mapped_episode(bag, msgs, tm) if tm else trial_episode(bag, msgs)
        if isinstance(got, str):
            skipped.append(f"{bag}: {got}")
            continue
        spec, ep = (None, got) if tm else got
        specs.append(spec)
        episodes.append(ep.validate())
    if not episodes:
        raise UserError("no episode in the bag(s): " + "; ".join(skipped))
    spec = mapped_spec(tm, episodes) if tm else specs[0]
    for bag, s in zip(bags, specs, strict=True):
        diffs = s.differences(spec, ignore=("instruction",)) if s is not None else []
        if diffs:
            raise UserError(f"bag {bag} was recorded with another policy spec than {bags[0]}: {diffs[0]}")
    with RunDir(out, what="an episode dataset", force=force, inputs=tuple(bags), replaceable=DATASET_ENTRIES):
        writer = EpisodeWriter(out, spec, meta={"producer": "sim-trainer dataset import-rosbag"})
        paths = [writer.write(ep) for ep in episodes]
    return {"episodes": len(paths), "skipped": skipped, "steps": sum(len(e) for e in episodes)}
