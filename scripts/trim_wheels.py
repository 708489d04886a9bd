#!/usr/bin/env python
"""Trim the ManiSkill and SAPIEN wheels of a wheelhouse to what the project's tabletop tasks use.

The GPU box gets the wheelhouse and the project's files in one transfer of at most 60 MiB, and the two wheels
as published are 150 MB. Dropped:
- mani-skill: every asset but the Panda arm's (URDF/SRDF, franka_description meshes, the wrist camera's RealSense
  mesh), the table scene and the grid floor texture, which PickCube/PushCube/StackCube/PullCube-v1 load (other
  robots, scenes and environment maps go);
- sapien: the C++ headers, the stereo-depth sensor's IR patterns, the macOS Vulkan loader and OpenImageDenoise
  (19 MB, used only by the ray-tracing denoiser). SAPIEN's renderer links OpenImageDenoise, so a stand-in library
  exporting the functions it calls, each failing with a message, takes its place (built with the C compiler,
  $CC or cc; without one OpenImageDenoise stays).
Python code is never dropped. Each wheel is rewritten in place with its RECORD updated; `--report` lists what
went. Usage: trim_wheels.py WHEEL... [--report FILE]
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MESH_OR_IMAGE = (".glb", ".gltf", ".obj", ".stl", ".dae", ".ply", ".png", ".jpg", ".jpeg", ".hdr", ".exr", ".ktx",
                 ".mtl", ".ttf")
MANISKILL_KEEP = ("mani_skill/assets/robots/panda/*.urdf", "mani_skill/assets/robots/panda/*.srdf",
                  "mani_skill/assets/robots/panda/franka_description/*",
                  "mani_skill/assets/robots/panda/realsense2_description/meshes/d415.stl",  # StackCube's wrist camera
                  "mani_skill/assets/partnet_mobility/meta/*", "mani_skill/utils/building/assets/grid_texture.png",
                  "mani_skill/utils/scene_builder/table/assets/*")
SAPIEN_DROP = ("sapien/include/*", "sapien/sensor/assets/patterns/*", "sapien/vulkan_library/*.dylib")
OIDN = "sapien/oidn_library/"
OIDN_STUB = r"""
/* Stand-in for OpenImageDenoise in a trimmed SAPIEN wheel (scripts/trim_wheels.py): the functions SAPIEN's
   renderer links, none of which runs unless its ray-tracing denoiser is switched on. */
typedef void *H;
static const char *MSG = "OpenImageDenoise was trimmed from this SAPIEN wheel (scripts/trim_wheels.py)";
H oidnNewCUDADevice(const int *ids, const void *streams, int n) { return 0; }
void oidnCommitDevice(H d) {}
int oidnGetDeviceError(H d, const char **msg) { if (msg) *msg = MSG; return 1; }
void oidnReleaseDevice(H d) {}
H oidnNewFilter(H d, const char *type) { return 0; }
void oidnCommitFilter(H f) {}
void oidnExecuteFilter(H f) {}
void oidnReleaseFilter(H f) {}
void oidnSetFilterBool(H f, const char *name, _Bool v) {}
void oidnSetFilterImage(H f, const char *name, H b, int fmt, unsigned long w, unsigned long h, unsigned long off,
                        unsigned long ps, unsigned long rs) {}
H oidnNewSharedBuffer(H d, void *p, unsigned long size) { return 0; }
void oidnReleaseBuffer(H b) {}
"""
# file in the wheel -> (its SONAME, C source): SAPIEN loads the core first, then the library its renderer links.
OIDN_FILES = {"libOpenImageDenoise_core.so.2.0.1": ("libOpenImageDenoise_core.so.2.0.1", ""),
              "libOpenImageDenoise.so.2.0.1": ("libOpenImageDenoise.so.2", OIDN_STUB)}


def build_oidn_stubs() -> dict[str, bytes] | None:
    """{wheel member: stub library}, or None without a C compiler (OpenImageDenoise then stays)."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (soname, source) in OIDN_FILES.items():
            src, lib = Path(tmp, "stub.c"), Path(tmp, name)
            src.write_text(source)
            subprocess.run([cc, "-shared", "-fPIC", "-O2", "-nostdlib", f"-Wl,-soname,{soname}", "-o", str(lib),
                            str(src)], check=True, capture_output=True)
            out[OIDN + name] = lib.read_bytes()
    return out


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}\n"


def dropped(name: str, stubs: dict[str, bytes] | None) -> bool:
    """Whether a wheel member goes (the rules above); dist-info and Python files always stay."""
    if ".dist-info/" in name or name.endswith((".py", ".pyi")):
        return False
    if name.startswith("mani_skill/"):
        if any(fnmatch.fnmatch(name, k) for k in MANISKILL_KEEP):
            return False
        return name.startswith("mani_skill/assets/") or name.lower().endswith(MESH_OR_IMAGE)
    if name.startswith(OIDN):
        return stubs is not None  # replaced by the stubs (the CUDA device module goes too)
    return any(fnmatch.fnmatch(name, d) for d in SAPIEN_DROP)


def trim(wheel: Path, stubs: dict[str, bytes] | None) -> tuple[int, int, int]:
    """Rewrite `wheel` without the dropped members (stubs added where they exist in it); (dropped, bytes before,
    bytes after)."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".trimming")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        names = set(src.namelist())
        gone = {n for n in names if dropped(n, stubs)}
        added = {k: v for k, v in (stubs or {}).items() if k in names}
        for info in src.infolist():
            if info.filename in gone and info.filename not in added:
                continue
            data = added.get(info.filename, src.read(info))
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join([ln for ln in lines if ln.split(",", 1)[0] not in gone]
                               + [record_line(k, v) for k, v in added.items()]).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        n = len(gone) - len(added)
    tmp.replace(wheel)
    return n, before, wheel.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheels", nargs="+", type=Path)
    p.add_argument("--report", type=Path, help="append one line per wheel here")
    args = p.parse_args(argv)
    lines = []
    stubs = build_oidn_stubs() if any(w.name.startswith("sapien-") for w in args.wheels) else {}
    if stubs is None:
        print("trim_wheels: no C compiler: OpenImageDenoise stays in the SAPIEN wheel (19 MB more)", file=sys.stderr)
    for wheel in args.wheels:
        if not wheel.is_file():
            print(f"error: no wheel {wheel}", file=sys.stderr)
            return 2
        n, before, after = trim(wheel, stubs)
        lines.append(f"{wheel.name}: {n} files dropped, {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
        print(lines[-1])
    if args.report:
        with args.report.open("a") as f:
            f.write("".join(ln + "\n" for ln in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
