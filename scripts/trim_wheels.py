#!/usr/bin/env python
"""Trim the ManiSkill and SAPIEN wheels of a wheelhouse to what the project's tabletop tasks use.

The GPU box gets the wheelhouse and the project's files in one transfer of at most 60 MiB, and the two wheels
as published are 150 MB. Dropped:
- mani-skill: every asset but the Panda arm's (URDF/SRDF, franka_description meshes, the wrist camera's RealSense
  mesh), the table scene and the grid floor texture, which PickCube/PushCube/StackCube/PullCube-v1 load (other
  robots, scenes and environment maps go);
- sapien: the OpenImageDenoise libraries (loaded only if present; used only by the ray-tracing denoiser), the C++
  headers, the stereo-depth sensor's IR patterns and the macOS Vulkan loader.
Python code is never dropped. Each wheel is rewritten in place with its RECORD updated; `--report` lists what
went. Usage: trim_wheels.py WHEEL... [--report FILE]
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import zipfile
from pathlib import Path

MESH_OR_IMAGE = (".glb", ".gltf", ".obj", ".stl", ".dae", ".ply", ".png", ".jpg", ".jpeg", ".hdr", ".exr", ".ktx",
                 ".mtl", ".ttf")
MANISKILL_KEEP = ("mani_skill/assets/robots/panda/*.urdf", "mani_skill/assets/robots/panda/*.srdf",
                  "mani_skill/assets/robots/panda/franka_description/*",
                  "mani_skill/assets/robots/panda/realsense2_description/meshes/d415.stl",  # StackCube's wrist camera
                  "mani_skill/assets/partnet_mobility/meta/*", "mani_skill/utils/building/assets/grid_texture.png",
                  "mani_skill/utils/scene_builder/table/assets/*")
SAPIEN_DROP = ("sapien/oidn_library/*", "sapien/include/*", "sapien/sensor/assets/patterns/*",
               "sapien/vulkan_library/*.dylib")


def dropped(name: str) -> bool:
    """Whether a wheel member goes (the rules above); dist-info and Python files always stay."""
    if ".dist-info/" in name or name.endswith((".py", ".pyi")):
        return False
    if name.startswith("mani_skill/"):
        if any(fnmatch.fnmatch(name, k) for k in MANISKILL_KEEP):
            return False
        return name.startswith("mani_skill/assets/") or name.lower().endswith(MESH_OR_IMAGE)
    return any(fnmatch.fnmatch(name, d) for d in SAPIEN_DROP)


def trim(wheel: Path) -> tuple[int, int, int]:
    """Rewrite `wheel` without the dropped members; (members dropped, bytes before, bytes after)."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".trimming")
    n = 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        gone = {i.filename for i in src.infolist() if dropped(i.filename)}
        n = len(gone)
        for info in src.infolist():
            if info.filename in gone:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(ln for ln in lines if ln.split(",", 1)[0] not in gone).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    tmp.replace(wheel)
    return n, before, wheel.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheels", nargs="+", type=Path)
    p.add_argument("--report", type=Path, help="append one line per wheel here")
    args = p.parse_args(argv)
    lines = []
    for wheel in args.wheels:
        if not wheel.is_file():
            print(f"error: no wheel {wheel}", file=sys.stderr)
            return 2
        n, before, after = trim(wheel)
        lines.append(f"{wheel.name}: {n} files dropped, {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
        print(lines[-1])
    if args.report:
        with args.report.open("a") as f:
            f.write("".join(ln + "\n" for ln in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
