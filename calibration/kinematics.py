"""Forward kinematics of a serial chain read from a URDF (default: ManiSkill's Panda, base -> TCP).

Reading the same URDF that the simulator uses keeps the real robot's tcp pose and the sim's identical;
ManiSkill's `panda_v2.urdf` is located without importing mani_skill (which would pull in torch).
"""

from __future__ import annotations

import importlib.util
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from calibration.transforms import make_T
from policy_runtime.errors import UserError

PANDA_BASE_LINK = "panda_link0"
PANDA_TCP_LINK = "panda_hand_tcp"


def maniskill_panda_urdf(give: str = "in samples.json (robot.urdf)") -> Path:
    """ManiSkill's Panda model, the default robot; a robot install has no ManiSkill and names its own URDF."""
    spec = importlib.util.find_spec("mani_skill")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"mani_skill is not installed (the [train] extra), so there is no default Panda URDF: "
                        f"give the robot's URDF {give}")
    return Path(list(spec.submodule_search_locations)[0]) / "assets" / "robots" / "panda" / "panda_v2.urdf"


@dataclass(frozen=True)
class _Joint:
    name: str
    kind: str  # revolute, continuous, prismatic or fixed
    origin: np.ndarray  # parent_T_joint at zero position
    axis: np.ndarray


class Chain:
    """The joints from base_link to tip_link; `forward` maps joint positions (by name) to base_T_tip."""

    def __init__(self, urdf: str | Path, base_link: str = PANDA_BASE_LINK, tip_link: str = PANDA_TCP_LINK):
        try:
            root = ET.parse(str(urdf)).getroot()
        except (OSError, ET.ParseError) as e:
            raise UserError(f"cannot read URDF {urdf}: {e}") from None
        by_child = {j.find("child").get("link"): j for j in root.iter("joint")}
        joints, link = [], tip_link
        while link != base_link:
            if link not in by_child:
                raise UserError(f"URDF {Path(urdf).name} has no joint chain from {base_link} to {tip_link}")
            j = by_child[link]
            joints.append(_parse_joint(j))
            link = j.find("parent").get("link")
        self.joints = joints[::-1]
        self.joint_names = [j.name for j in self.joints if j.kind != "fixed"]

    def forward(self, positions: dict[str, float]) -> np.ndarray:
        missing = [n for n in self.joint_names if n not in positions]
        if missing:
            raise UserError(f"joint_positions lacks {', '.join(missing)} "
                            f"(the chain needs {', '.join(self.joint_names)})")
        T = np.eye(4)
        for j in self.joints:
            T = T @ j.origin
            if j.kind in ("revolute", "continuous"):
                T = T @ make_T(Rotation.from_rotvec(j.axis * float(positions[j.name])).as_matrix(), np.zeros(3))
            elif j.kind == "prismatic":
                T = T @ make_T(np.eye(3), j.axis * float(positions[j.name]))
        return T


def _parse_joint(j: ET.Element) -> _Joint:
    kind = j.get("type")
    if kind not in ("revolute", "continuous", "prismatic", "fixed"):
        raise UserError(f"URDF joint {j.get('name')} has unsupported type {kind}")
    origin = j.find("origin")
    xyz = np.array([float(v) for v in (origin.get("xyz", "0 0 0") if origin is not None else "0 0 0").split()])
    rpy = np.array([float(v) for v in (origin.get("rpy", "0 0 0") if origin is not None else "0 0 0").split()])
    axis_el = j.find("axis")
    axis = np.array([float(v) for v in (axis_el.get("xyz") if axis_el is not None else "1 0 0").split()])
    # URDF rpy are fixed-axis roll, pitch, yaw: R = Rz(yaw) Ry(pitch) Rx(roll).
    return _Joint(j.get("name"), kind, make_T(Rotation.from_euler("xyz", rpy).as_matrix(), xyz),
                  axis / np.linalg.norm(axis))
