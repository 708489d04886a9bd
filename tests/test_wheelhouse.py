"""The offline wheelhouse for a GPU box (scripts/wheelhouse.sh): it resolves for CPython 3.12 with no network, it
fits one 60 MiB transfer with the project's files, and the trimmed ManiSkill still builds the tabletop tasks.

Building the wheelhouse needs the package index (CI has it); without it these tests skip, saying so. Set
GPU_WHEELHOUSE=DIR to test an existing wheelhouse instead of building one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.bad_input import ROOT

SCRIPTS = ROOT / "scripts"
PY312 = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    a for p in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_26", "manylinux_2_17", "manylinux2014")
    for a in ("--platform", f"{p}_x86_64")]
BUDGET_MIB = 60


def pip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    given = os.environ.get("GPU_WHEELHOUSE")
    if given:
        return Path(given)
    probe = tmp_path_factory.mktemp("probe")
    if pip("download", "--no-deps", "--timeout", "15", "--retries", "0", "-d", str(probe),
           "farama-notifications==0.0.6", timeout=120).returncode:
        pytest.skip("no package index reachable: the wheelhouse cannot be built here (CI has one)")
    out = tmp_path_factory.mktemp("wheelhouse") / "wh"
    res = subprocess.run(["bash", str(SCRIPTS / "wheelhouse.sh"), "--python", "3.12", "--out", str(out)],
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def pins(path: Path) -> list[str]:
    return [ln.split("#")[0].strip() for ln in path.read_text().splitlines() if ln.split("#")[0].strip()]


def sections(path: Path) -> dict[str, set[str]]:
    """gpu_image_packages.txt: {"image": names, "unused": names} (a trailing "+" marks bundleable image deps)."""
    out: dict[str, set[str]] = {}
    current = None
    for ln in path.read_text().splitlines():
        ln = ln.split("#")[0].strip()
        if ln.startswith("["):
            current = out.setdefault(ln.strip("[]"), set())
        elif ln and current is not None:
            current.add(canonicalize_name(ln.removesuffix("+").strip()))
    return out


def test_the_bundle_resolves_for_python_312_with_no_network(wheelhouse, tmp_path):
    wanted = {canonicalize_name(Requirement(p).name) for p in pins(SCRIPTS / "gpu_wheelhouse.txt")}
    report = tmp_path / "report.json"
    res = pip("install", "--dry-run", "--no-index", "--no-deps", "--find-links", str(wheelhouse / "wheels"),
              "--target", str(tmp_path / "site"), "--report", str(report), *PY312, "-r",
              str(wheelhouse / "requirements.txt"))
    assert res.returncode == 0, res.stderr
    resolved = {canonicalize_name(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]}
    assert resolved == wanted
    assert "torch" not in resolved  # the GPU box keeps its own


def test_every_dependency_is_bundled_provided_by_the_image_or_known_unused(wheelhouse):
    listed = sections(SCRIPTS / "gpu_image_packages.txt")
    bundled = {canonicalize_name(Requirement(p).name) for p in pins(SCRIPTS / "gpu_wheelhouse.txt")}
    known = bundled | listed["image"] | listed["unused"]
    env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    missing = {}
    for wheel in (wheelhouse / "wheels").glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for line in meta.splitlines():
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.removeprefix("Requires-Dist:").strip())
                if (req.marker is None or req.marker.evaluate(env)) and canonicalize_name(req.name) not in known:
                    missing.setdefault(wheel.name, []).append(req.name)
    assert not missing, f"dependencies neither bundled, in the image nor known unused: {missing}"


def test_the_bundle_and_the_project_fit_one_transfer(wheelhouse):
    bundle = sum(p.stat().st_size for p in wheelhouse.rglob("*") if p.is_file())
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    project = sum((ROOT / f).stat().st_size for f in tracked.decode().split("\0") if f and (ROOT / f).is_file())
    assert (bundle + project) / 2**20 < BUDGET_MIB, f"bundle {bundle / 2**20:.1f} + project {project / 2**20:.1f} MiB"


def trimmed_sapien_for_this_python(wheelhouse: Path, tmp: Path) -> Path:
    """The bundle's SAPIEN wheel when it is for this Python, else the same release for it, trimmed the same way."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    (bundled,) = (wheelhouse / "wheels").glob("sapien-*.whl")
    if f"-{tag}-" in bundled.name:
        return bundled
    version = bundled.name.split("-")[1]
    if pip("download", "--no-deps", "--only-binary=:all:", "-d", str(tmp), f"sapien=={version}").returncode:
        pytest.skip(f"no package index reachable for SAPIEN {version} ({tag}), to test the trimmed wheel here")
    (wheel,) = tmp.glob("sapien-*.whl")
    subprocess.run([sys.executable, str(SCRIPTS / "trim_wheels.py"), str(wheel)], check=True, capture_output=True)
    return wheel


def test_the_trimmed_wheels_build_the_tabletop_tasks_on_the_cpu_backend(wheelhouse, tmp_path):
    """The trimmed ManiSkill (pure Python) and SAPIEN, installed alone, must find every asset and library they load:
    SAPIEN's renderer links OpenImageDenoise, whose stand-in must load, and PushCube-v1 must render."""
    (maniskill,) = (wheelhouse / "wheels").glob("mani_skill-*.whl")
    sapien = trimmed_sapien_for_this_python(wheelhouse, tmp_path)
    site = tmp_path / "site"
    res = pip("install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(site), str(maniskill),
              str(sapien))
    assert res.returncode == 0, res.stderr
    code = f"""
import gymnasium as gym, mani_skill, mani_skill.envs, sapien, torch
for mod in (mani_skill, sapien):
    assert mod.__file__.startswith({str(site)!r}), mod.__file__
for task, obs in [("PushCube-v1", "state"), ("PushCube-v1", "rgb"), ("PickCube-v1", "state"),
                  ("StackCube-v1", "state"), ("PullCube-v1", "state")]:
    env = gym.make(task, obs_mode=obs, control_mode="pd_joint_delta_pos", sim_backend="physx_cpu",
                   render_backend="cpu", sensor_configs={{"width": 64, "height": 64}})
    obs0, _ = env.reset(seed=0)
    env.step(torch.zeros(env.action_space.shape))
    if obs == "rgb":
        assert obs0["sensor_data"]["base_camera"]["rgb"].float().std() > 0
    env.close()
print("built")
"""
    env = {**os.environ, "PYTHONPATH": str(site)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0 and "built" in res.stdout, res.stderr[-3000:]
