"""Reading an export directory (contract 3) without torch: manifest checks, model hash, and the wire contract.

A robot-side host only has the export directory; everything it needs to serve and to agree with a client
comes from manifest.json, and a model file whose sha256 differs from the manifest is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from policy_runtime.errors import UserError
from policy_runtime.protocol import CameraContract, Contract

MANIFEST_FORMAT = "flow-vla-export"
MANIFEST_VERSION = 1  # newest manifest version this runtime reads


PANDA_ARM_JOINTS = tuple(f"panda_joint{i}" for i in range(1, 8))
GRIPPER_ACTION = "gripper"


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
class ExportDir:
    path: Path
    manifest: dict
    model_path: Path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_export(path: str | Path, verify_hash: bool = True) -> ExportDir:
    """Load and verify an export directory; every problem is a one-line UserError."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"export {path} does not exist or is not a directory")
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise UserError(f"export {path} has no manifest.json")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"export {path}: manifest.json is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"export {path}: manifest.json is not a {MANIFEST_FORMAT} manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or not 1 <= version <= MANIFEST_VERSION:
        raise UserError(f"export {path}: manifest version {version!r} is not supported (this runtime reads 1.."
                        f"{MANIFEST_VERSION})")
    model_file = manifest.get("model_file")
    if not isinstance(model_file, str) or Path(model_file).name != model_file:
        raise UserError(f"export {path}: manifest model_file {model_file!r} is not a file name")
    model_path = path / model_file
    if not model_path.is_file():
        raise UserError(f"export {path}: model file {model_file} is missing")
    contract_from_manifest(manifest, "check", "none", where=str(path))  # fail now on missing/malformed fields
    if verify_hash:
        got = file_sha256(model_path)
        if got != manifest.get("model_sha256"):
            raise UserError(f"export {path}: {model_file} sha256 {got[:12]}... does not match the manifest's "
                            f"{str(manifest.get('model_sha256'))[:12]}... (corrupt or replaced file)")
        _verify_norm_stats(path, manifest)
    return ExportDir(path, manifest, model_path)


def _verify_norm_stats(path: Path, manifest: dict) -> None:
    """The normalisation file travels with the export; clients check its hash, so a missing or edited one is fatal."""
    norm = manifest["normalisation"]  # a map with a sha256: contract_from_manifest checked it
    name = norm.get("file", "norm_stats.json")
    if not isinstance(name, str) or Path(name).name != name:
        raise UserError(f"export {path}: manifest normalisation file {name!r} is not a file name")
    if not (path / name).is_file():
        raise UserError(f"export {path}: {name} is missing (the manifest's normalisation hash refers to it)")
    got = file_sha256(path / name)
    if got != norm.get("sha256"):
        raise UserError(f"export {path}: {name} sha256 {got[:12]}... does not match the manifest's "
                        f"{str(norm.get('sha256'))[:12]}... (truncated or edited file)")


def contract_from_manifest(m: dict, backend: str, provider: str, where: str = "export") -> Contract:
    """The hello-reply contract of an export; raises UserError naming the first missing or malformed field."""
    try:
        c = Contract(
            model_sha256=str(m["model_sha256"]), backend=backend, provider=provider,
            horizon=int(m["horizon"]), exec_steps=int(m["exec_steps"]), action_dim=int(m["action_dim"]),
            num_steps=int(m["num_steps"]), control_mode=str(m["action"]["control_mode"]),
            action_low=tuple(float(x) for x in m["action"]["low"]),
            action_high=tuple(float(x) for x in m["action"]["high"]), clip_actions=True,
            cameras=tuple(CameraContract(str(c["name"]), int(c["height"]), int(c["width"])) for c in m["cameras"]),
            state_dim=int(m["state"]["dim"]), state_layout=tuple((str(n), int(k)) for n, k in m["state"]["layout"]),
            normalisation_sha256=str(m["normalisation"]["sha256"]), control_hz=float(m["control_hz"]),
            text_max_len=int(m["text"]["max_len"]), default_instruction=str(m["text"]["instruction"]),
            task=str(m.get("task", "")),
            action_joints=tuple(str(j) for j in m["action"].get("joints") or default_action_joints(
                str(m["action"]["control_mode"]), int(m["action_dim"]))))
    except KeyError as e:
        raise UserError(f"{where}: manifest.json lacks field {e}") from None
    except (TypeError, ValueError) as e:
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


def _check_ranges(c: Contract, where: str) -> None:
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
    bad_cam = next((cam for cam in c.cameras if cam.height < 1 or cam.width < 1), None)
    if bad_cam is not None:
        raise UserError(f"{where}: manifest camera {bad_cam.name} has size {bad_cam.height}x{bad_cam.width}")
    if any(k < 0 for _, k in c.state_layout):
        raise UserError(f"{where}: manifest state layout has a negative size")
