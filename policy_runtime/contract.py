"""The contract: everything that crosses a boundary between training, export, serving and the robot, defined once.

- the policy spec (`PolicySpec`): observation layout, cameras, state layout, action space, control rate;
- the controller semantics (`ControllerSemantics`): control mode, the joint each action drives, the gripper
  mapping, the scaling of a normalised action onto the joints, the action bounds and the control rate;
- the export manifest schema (`build_manifest` writes it, `contract_from_manifest` reads and checks it);
- the episode schema (format name, version and HDF5 attribute names);
- the ONNX graph's input and output names, and the instruction tokenizer.

The exporter writes it; the trainer, runtime, client, ROS nodes, safety filter and recorder only read it.
Torch-free (numpy only): the robot side imports this module. Any change to a field here is a change of
`CONTRACT_VERSION` (and, where the manifest's schema changes, of `MANIFEST_VERSION`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from policy_runtime.errors import UserError

CONTRACT_VERSION = 2  # 1: PolicySpec + manifest v1; 2: controller semantics (scaling) in the manifest and hello

# ----- graph names ----------------------------------------------------------------------------------------------------
IMAGE_INPUT_PREFIX = "image."
STATE_INPUT, TEXT_INPUT, NOISE_INPUT = "state", "text", "noise"
ACTIONS_OUTPUT = "actions"


def image_input(camera: str) -> str:
    """The graph input that takes `camera`'s [B, H, W, 3] uint8 RGB frames."""
    return f"{IMAGE_INPUT_PREFIX}{camera}"


def graph_input_names(cameras: list[str] | tuple[str, ...]) -> list[str]:
    """Every graph input, in the order the exported graph takes them."""
    return [image_input(c) for c in cameras] + [STATE_INPUT, TEXT_INPUT, NOISE_INPUT]


def graph_feeds(images: dict[str, np.ndarray], state: np.ndarray, text: np.ndarray,
                noise: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's inputs keyed by their names (images by camera name), batch on axis 0."""
    return {**{image_input(c): v for c, v in images.items()}, STATE_INPUT: state, TEXT_INPUT: text,
            NOISE_INPUT: noise}


def zero_feeds(contract, batch: int) -> dict[str, np.ndarray]:
    """Inputs of the right dtypes and shapes for a warm-up run (the default instruction, zero noise)."""
    return graph_feeds({c.name: np.zeros((batch, c.height, c.width, 3), np.uint8) for c in contract.cameras},
                       np.zeros((batch, contract.state_dim), np.float32),
                       np.tile(instruction_tokens(contract, contract.default_instruction), (batch, 1)),
                       np.zeros((batch, contract.horizon, contract.action_dim), np.float32))


def graph_shapes(contract) -> dict[str, tuple[int, ...]]:
    """Each graph input's and the output's shape after the batch axis."""
    return {**{image_input(c.name): (c.height, c.width, 3) for c in contract.cameras},
            STATE_INPUT: (contract.state_dim,), TEXT_INPUT: (contract.text_max_len,),
            NOISE_INPUT: (contract.horizon, contract.action_dim),
            ACTIONS_OUTPUT: (contract.horizon, contract.action_dim)}


# ----- tokenizer ------------------------------------------------------------------------------------------------------
TOKENIZER = "utf8-bytes-v1"
PAD, BOS = 0, 1
VOCAB_SIZE = 256 + 2
TOKENIZER_RULE = f"{TOKENIZER} (BOS={BOS}, PAD={PAD}, byte b -> b+2)"


def tokenize(text: str, max_len: int) -> np.ndarray:
    """[max_len] int64: BOS, the UTF-8 bytes offset by 2, then PAD; too-long text is truncated.

    No vocabulary file to ship: any UTF-8 text is representable.
    """
    ids = [BOS] + [b + 2 for b in text.encode("utf-8", "surrogatepass")][: max_len - 1]
    return np.asarray(ids + [PAD] * (max_len - len(ids)), dtype=np.int64)


# A backbone (pi0, pi0.5) ships its own tokenizer.json in the export; its prompt rule says what text it encodes.
# The models use these same functions, so training, export and serving tokenise alike.
def _clean(text: str) -> str:
    return text.strip().replace("_", " ").replace("\n", " ")


PROMPTS = {
    "pi0": lambda t: t if t.endswith("\n") else t + "\n",  # the instruction and a newline (BOS from the tokenizer)
    "pi05": lambda t: f"Task: {_clean(t)}, State:",  # the state's part is built inside the graph
    "smolvla": lambda t: t if t.endswith("\n") else t + "\n",
}


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str):
    try:
        from tokenizers import Tokenizer  # a small Rust wheel, no torch
    except ImportError:
        raise UserError("this export tokenises instructions with its own tokenizer.json: install the [vla] extra "
                        "(the tokenizers package)") from None
    tok = Tokenizer.from_file(path)
    tok.no_truncation()
    tok.no_padding()
    return tok


def tokenize_with_file(path: str | Path, prompt: str, pad_id: int, text: str, max_len: int) -> np.ndarray:
    """[max_len] int64 ids of PROMPTS[prompt](text) under tokenizer.json at `path`, truncated, right-padded."""
    ids = _load_tokenizer(str(path)).encode(PROMPTS[prompt](text)).ids[:max_len]
    return np.asarray(ids + [pad_id] * (max_len - len(ids)), dtype=np.int64)


def instruction_tokens(contract, text: str) -> np.ndarray:
    """The graph's text input for `text` under the served model's tokenizer (the byte rule, or its own file)."""
    if not contract.tokenizer_file:
        return tokenize(text, contract.text_max_len)
    return tokenize_with_file(contract.tokenizer_file, contract.prompt, contract.text_pad_id, text,
                              contract.text_max_len)


# ----- policy spec ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CameraSpec:
    name: str
    height: int
    width: int


@dataclass(frozen=True)
class PolicySpec:
    """Observation and action contract between an environment (sim or real) and a policy.

    Stored in every checkpoint, export and dataset: loading a policy against a task compares the two specs and
    names every difference, so a mismatch is an error message, not a silent failure.
    """

    task: str
    control_mode: str
    obs_mode: str
    cameras: tuple[CameraSpec, ...]
    state_layout: tuple[tuple[str, int], ...]  # (name, size) of each block of the flat state vector
    action_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    control_hz: float
    instruction: str

    @property
    def state_dim(self) -> int:
        return sum(n for _, n in self.state_layout)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["state_layout"] = [list(x) for x in self.state_layout]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PolicySpec:
        try:
            return cls(
                task=d["task"],
                control_mode=d["control_mode"],
                obs_mode=d["obs_mode"],
                cameras=tuple(CameraSpec(**c) for c in d["cameras"]),
                state_layout=tuple((str(n), int(k)) for n, k in d["state_layout"]),
                action_dim=int(d["action_dim"]),
                action_low=tuple(float(x) for x in d["action_low"]),
                action_high=tuple(float(x) for x in d["action_high"]),
                control_hz=float(d["control_hz"]),
                instruction=str(d["instruction"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"malformed policy spec: {e!r}") from None

    def differences(self, other: PolicySpec, ignore: tuple[str, ...] = ("task", "instruction")) -> list[str]:
        """Human-readable list of fields that differ (task and instruction may differ across tasks)."""
        out = []
        for f in fields(self):
            if f.name in ignore:
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                out.append(f"{f.name}: policy has {short(a)}, environment has {short(b)}")
        return out


def short(v: object) -> str:
    s = repr(v)
    return s if len(s) < 120 else s[:117] + "..."


# ----- controller semantics -------------------------------------------------------------------------------------------
PANDA_ARM_JOINTS = tuple(f"panda_joint{i}" for i in range(1, 8))
PANDA_FINGER_JOINTS = ("panda_finger_joint1", "panda_finger_joint2")
GRIPPER_ACTION = "gripper"  # the action entry that sets both fingers' absolute position (a mimic joint)
# ManiSkill's Panda joint-space controllers: an arm entry in [-1, 1] maps linearly onto a delta in
# ARM_DELTA rad, the gripper entry onto an absolute finger position in GRIPPER_RANGE m.
ARM_DELTA = (-0.1, 0.1)
GRIPPER_RANGE = (-0.01, 0.04)
# Delta joint-space control modes the robot side executes, by what the delta is added to.
DELTA_REFERENCE = {"pd_joint_delta_pos": "measured", "pd_joint_target_delta_pos": "target"}
# The graph's output is the raw action chunk (never clipped: manifest `output.clipped` is false); the server clips
# it to [low, high] unless told not to, and says so in the hello contract (`action.clipped`).
GRAPH_CLIPS_ACTIONS = False
RUNTIME_CLIPS_ACTIONS = True


def default_action_joints(control_mode: str, action_dim: int) -> tuple[str, ...]:
    """The joints of ManiSkill's Panda joint-space controllers, in action order (what every task here trains).

    Manifests that do not list `action.joints` get these, so a robot side that maps the actions onto other
    joints (or in another order) is refused at connect, not discovered when the wrong joint moves.
    """
    if not control_mode.startswith("pd_joint"):
        return ()
    if action_dim == len(PANDA_ARM_JOINTS) + 1:
        return (*PANDA_ARM_JOINTS, GRIPPER_ACTION)
    return PANDA_ARM_JOINTS if action_dim == len(PANDA_ARM_JOINTS) else ()


@dataclass(frozen=True)
class ControllerSemantics:
    """What one normalised action vector means to the controller that executes it.

    `action_joints[i]` is the joint action entry i drives (GRIPPER_ACTION: both fingers' absolute position);
    an arm entry a in [-1, 1] becomes a joint delta of low + (a + 1) / 2 * (high - low) with (low, high) =
    `arm_delta` (rad), added to the measured position or to the previous target (`delta_reference`); the
    gripper entry maps the same way onto `gripper_range` (m). Actions are clipped to [action_low, action_high]
    and one is executed every 1 / control_hz s.
    """

    control_mode: str
    action_joints: tuple[str, ...]
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    control_hz: float
    arm_delta: tuple[float, float] = ARM_DELTA
    gripper_range: tuple[float, float] = GRIPPER_RANGE

    @classmethod
    def of(cls, spec: PolicySpec) -> ControllerSemantics:
        """The controller a policy trained for `spec` drives (ManiSkill's Panda controllers)."""
        return cls(spec.control_mode, default_action_joints(spec.control_mode, spec.action_dim),
                   tuple(spec.action_low), tuple(spec.action_high), float(spec.control_hz))

    @property
    def delta_reference(self) -> str | None:
        """'measured' or 'target' for a delta joint mode the robot side executes; None for any other mode."""
        return DELTA_REFERENCE.get(self.control_mode)

    @property
    def arm_joints(self) -> tuple[str, ...]:
        return tuple(j for j in self.action_joints if j != GRIPPER_ACTION)

    def mismatches(self, control_mode: str | None = None, action_joints: tuple[str, ...] | None = None,
                   control_hz: float | None = None) -> list[str]:
        """One line per difference from what a robot side executes (None: not checked), naming both values."""
        out = []
        if control_mode is not None and control_mode != self.control_mode:
            out.append(f"policy control_mode {self.control_mode!r} does not match the robot's {control_mode!r}")
        if action_joints is not None and self.action_joints and tuple(action_joints) != self.action_joints:
            out.append(f"policy action joints {list(self.action_joints)} do not match the robot's "
                       f"{list(action_joints)}")
        if control_hz is not None and not math.isclose(control_hz, self.control_hz, rel_tol=1e-9):
            out.append(f"policy control_hz {self.control_hz:g} does not match the robot's control_hz {control_hz:g}")
        return out


# ----- manifest -------------------------------------------------------------------------------------------------------
MANIFEST_FORMAT = "flow-vla-export"
MANIFEST_VERSION = 2  # newest manifest version written and read; 1: no action.arm_delta / action.gripper_range
MANIFEST_FILE = "manifest.json"
NORM_STATS_FILE = "norm_stats.json"


def build_manifest(spec: PolicySpec, controller: ControllerSemantics, *, model_file: str, model_sha256: str,
                   horizon: int, exec_steps: int, num_steps: int, max_text_len: int, norm_stats: dict,
                   norm_sha256: str, extra: dict, text: dict | None = None) -> dict:
    """The manifest of an export: the spec and controller as the robot side reads them, plus model facts.

    `extra` holds provenance (checkpoint, ONNX versions, parity) that no reader acts on.
    """
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "contract_version": CONTRACT_VERSION,
        "model_file": model_file,
        "model_sha256": model_sha256,
        "num_steps": num_steps,
        "horizon": horizon,
        "exec_steps": exec_steps,
        "action_dim": spec.action_dim,
        "action": {"control_mode": controller.control_mode, "low": list(controller.action_low),
                   "high": list(controller.action_high), "joints": list(controller.action_joints),
                   "arm_delta": list(controller.arm_delta), "gripper_range": list(controller.gripper_range),
                   "units": "normalised controller action in [low, high] (ManiSkill convention)"},
        "cameras": [{"name": c.name, "input": image_input(c.name), "height": c.height, "width": c.width,
                     "dtype": "uint8", "layout": "HWC RGB"} for c in spec.cameras],
        "state": {"input": STATE_INPUT, "dim": spec.state_dim, "layout": [list(x) for x in spec.state_layout],
                  "dtype": "float32", "normalised_in_graph": True},
        "text": text or {"input": TEXT_INPUT, "tokenizer": TOKENIZER_RULE, "max_len": max_text_len,
                         "instruction": spec.instruction, "tokens": tokenize(spec.instruction, max_text_len).tolist()},
        "noise": {"input": NOISE_INPUT, "shape": [horizon, spec.action_dim], "dtype": "float32",
                  "distribution": "standard normal, flow time tau = 1"},
        "output": {"name": ACTIONS_OUTPUT, "shape": [horizon, spec.action_dim], "dtype": "float32",
                   "unnormalised": True, "clipped": GRAPH_CLIPS_ACTIONS},
        "batch": "dynamic (dimension 0 of every input and of the output)",
        "normalisation": {"kind": "zscore", "in_graph": True, "file": NORM_STATS_FILE, "stats": norm_stats,
                          "sha256": norm_sha256},
        "control_hz": controller.control_hz,
        "task": spec.task,
        "spec": spec.to_dict(),
        **extra,
    }


def check_manifest_header(m: object, where: str) -> int:
    """The manifest's version, after checking its format; one line naming the version when it is not read here."""
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{where}: manifest.json is not a {MANIFEST_FORMAT} manifest")
    version = m.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= MANIFEST_VERSION:
        raise UserError(f"{where}: manifest version {version!r} is not supported (this runtime reads 1.."
                        f"{MANIFEST_VERSION})")
    return version


def _pair(v: object, default: tuple[float, float]) -> tuple[float, float]:
    if v is None:
        return default
    lo, hi = (float(x) for x in v)  # type: ignore[union-attr]
    return lo, hi


def _text_tokenizer(text: dict, where: str) -> dict:
    """The contract's tokenizer fields: none for the byte rule, else the model's tokenizer.json in the export
    (or checkpoint) directory `where`, its prompt rule and pad id."""
    name = text.get("file")
    if name is None:
        return {}
    if not isinstance(name, str) or Path(name).name != name:
        raise UserError(f"{where}: manifest text.file {name!r} is not a file name")
    path = Path(where) / name
    if not path.is_file():
        raise UserError(f"{where}: {name} is missing (the manifest's text.file names the model's tokenizer)")
    prompt = text.get("prompt")
    if prompt not in PROMPTS:
        raise UserError(f"{where}: manifest text.prompt {prompt!r} is not one of {', '.join(PROMPTS)}")
    try:
        _load_tokenizer(str(path.resolve()))
    except UserError:
        raise
    except Exception as e:  # the tokenizers library raises its own exception type
        raise UserError(f"{where}: cannot read the tokenizer {name}: {' '.join(str(e).split())[:160]}") from None
    return {"tokenizer_file": str(path.resolve()), "prompt": prompt, "text_pad_id": int(text["pad_id"])}


def contract_from_manifest(m: dict, backend: str, provider: str, where: str = "export",
                           clip_actions: bool = RUNTIME_CLIPS_ACTIONS):
    """The hello-reply contract of an export; raises UserError naming the first missing or malformed field.

    A version-1 manifest has no scaling fields: it gets the ManiSkill Panda controller's (what v1 exports meant).
    """
    from policy_runtime.protocol import Contract

    try:
        a = m["action"]
        control_mode, action_dim = str(a["control_mode"]), int(m["action_dim"])
        c = Contract(
            model_sha256=str(m["model_sha256"]), backend=backend, provider=provider,
            horizon=int(m["horizon"]), exec_steps=int(m["exec_steps"]), action_dim=action_dim,
            num_steps=int(m["num_steps"]), control_mode=control_mode,
            action_low=tuple(float(x) for x in a["low"]),
            action_high=tuple(float(x) for x in a["high"]), clip_actions=clip_actions,
            cameras=tuple(CameraSpec(str(c["name"]), int(c["height"]), int(c["width"])) for c in m["cameras"]),
            state_dim=int(m["state"]["dim"]), state_layout=tuple((str(n), int(k)) for n, k in m["state"]["layout"]),
            normalisation_sha256=str(m["normalisation"]["sha256"]), control_hz=float(m["control_hz"]),
            text_max_len=int(m["text"]["max_len"]), default_instruction=str(m["text"]["instruction"]),
            task=str(m.get("task", "")), obs_mode=str((m.get("spec") or {}).get("obs_mode", "")),
            action_joints=tuple(str(j) for j in a.get("joints") or default_action_joints(control_mode, action_dim)),
            arm_delta=_pair(a.get("arm_delta"), ARM_DELTA), gripper_range=_pair(a.get("gripper_range"), GRIPPER_RANGE),
            **_text_tokenizer(m["text"], where))
    except KeyError as e:
        raise UserError(f"{where}: manifest.json lacks field {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{where}: manifest.json has a malformed field ({e})") from None
    if len(c.action_low) != c.action_dim or len(c.action_high) != c.action_dim:
        raise UserError(f"{where}: manifest action bounds do not have action_dim={c.action_dim} entries")
    if c.action_joints and len(c.action_joints) != c.action_dim:
        raise UserError(f"{where}: manifest action.joints has {len(c.action_joints)} names for action_dim="
                        f"{c.action_dim}")
    if sum(k for _, k in c.state_layout) != c.state_dim:
        raise UserError(f"{where}: manifest state layout does not add up to state dim {c.state_dim}")
    if c.horizon < 1 or c.action_dim < 1 or c.text_max_len < 2:  # no cameras is fine: a state-only policy
        raise UserError(f"{where}: manifest has a non-positive horizon/action_dim/max_len")
    _check_ranges(c, where)
    return c


def _check_ranges(c, where: str) -> None:
    """Numbers a robot acts on: each must be in range, or the manifest is refused naming the field and value."""
    if not 1 <= c.exec_steps <= c.horizon:
        raise UserError(f"{where}: manifest exec_steps {c.exec_steps} is outside [1, horizon={c.horizon}]")
    if c.num_steps < 1:
        raise UserError(f"{where}: manifest num_steps {c.num_steps} must be >= 1")
    if not (math.isfinite(c.control_hz) and c.control_hz > 0):
        raise UserError(f"{where}: manifest control_hz {c.control_hz} must be a positive finite number")
    pairs = list(zip(c.action_low, c.action_high, strict=True))
    if not all(math.isfinite(lo) and math.isfinite(hi) and lo <= hi for lo, hi in pairs):
        raise UserError(f"{where}: manifest action bounds must be finite with low <= high")
    for name, (lo, hi) in (("arm_delta", c.arm_delta), ("gripper_range", c.gripper_range)):
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise UserError(f"{where}: manifest action.{name} {[lo, hi]} must be finite with low < high")
    bad_cam = next((cam for cam in c.cameras if cam.height < 1 or cam.width < 1), None)
    if bad_cam is not None:
        raise UserError(f"{where}: manifest camera {bad_cam.name} has size {bad_cam.height}x{bad_cam.width}")
    if any(k < 0 for _, k in c.state_layout):
        raise UserError(f"{where}: manifest state layout has a negative size")


# ----- episode schema ---------------------------------------------------------------------------------------------
EPISODE_FORMAT = "vla-episodes"
EPISODE_VERSION = 1
EPISODE_SOURCES = ("sim", "real-proxy", "real")
DATASET_META_FILE = "dataset.json"
# HDF5 attributes of every episode file; the arrays are datasets `state`, `actions`, optional `reward` and
# `timestamps`, and one dataset per camera under the group `images`.
EPISODE_ATTRS = ("format", "version", "instruction", "success", "control_hz", "source", "task", "control_mode",
                 "state_layout", "provenance")
