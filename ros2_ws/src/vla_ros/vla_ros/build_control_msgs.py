"""Build control_msgs' FollowJointTrajectory action for rclpy from its .action files, without a ROS 2 install.

A robot workstation has control_msgs from its ROS 2 distribution; a host with only the ROS 2 wheels from PyPI
(CI, development) does not, and no wheel ships it. This runs the rosidl generators that come with those wheels
(rosidl_adapter, rosidl_generator_c/py, rosidl_typesupport_c/fastrtps_c/introspection_c, no CMake) on
control_msgs' own interface files, compiles the generated C/C++ with the system compiler against the
wheels' headers and libraries, and writes an importable `control_msgs` Python package (its libraries inside
it, preloaded by its __init__, so only PYTHONPATH is needed). Only the interfaces the action needs are built.

    python -m vla_ros.build_control_msgs --src CONTROL_MSGS_DIR --out DIR   # then: export PYTHONPATH=DIR:...

CONTROL_MSGS_DIR holds `action/FollowJointTrajectory.action` and `msg/JointTolerance.msg`,
`msg/JointComponentTolerance.msg`: the `control_msgs/` folder of a checkout of
https://github.com/ros-controls/control_msgs (the branch of your ROS 2 distribution), or a ROS install's
share/control_msgs. Exit code 2 with one line for a missing file, compiler or generator.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

PACKAGE = "control_msgs"
INTERFACES = ("msg/JointTolerance", "msg/JointComponentTolerance", "action/FollowJointTrajectory")
DEPENDENCIES = ("trajectory_msgs", "builtin_interfaces", "std_msgs", "geometry_msgs", "action_msgs",
                "unique_identifier_msgs", "service_msgs")
TYPESUPPORTS = ("c", "fastrtps_c", "introspection_c")


class BuildError(Exception):
    """Something the build needs is missing; the message says what."""


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        first = next((ln for ln in (r.stderr or r.stdout).splitlines() if "error" in ln), r.stderr.strip()[:300])
        raise BuildError(f"{Path(cmd[0]).name} failed: {first}")


def _generators(names: set[str]) -> list:
    """The rosidl generator extensions by name (each once: the wheels register some entry points twice)."""
    found = {}
    for group, kind in (("rosidl_cli.command.generate.type_extensions", "type"),
                        ("rosidl_cli.command.generate.typesupport_extensions", "ts")):
        for ep in entry_points(group=group):
            if ep.name in names and (kind, ep.name) not in found:
                found[(kind, ep.name)] = ep.load()(ep.name)
    missing = {f"type {n}" for n in ("c", "py") if ("type", n) not in found} | \
        {f"typesupport {n}" for n in TYPESUPPORTS if ("ts", n) not in found}
    if missing:
        raise BuildError(f"rosidl generator(s) not installed: {', '.join(sorted(missing))} (pip install -e '.[ros]')")
    return [(f"{kind}_{name}", ext) for (kind, name), ext in found.items()]


def generate(src: Path, work: Path, prefix: Path) -> None:
    """Interface files -> IDL -> C, C typesupports and Python sources under `work`."""
    import os

    from rosidl_adapter import convert_to_idl

    os.environ.setdefault("AMENT_PREFIX_PATH", str(prefix))  # the generators look up typesupports in the index
    idl = work / "idl"
    for name in INTERFACES:
        suffix = ".action" if name.startswith("action/") else ".msg"
        with contextlib.redirect_stdout(io.StringIO()):  # it reports every file it reads and writes
            convert_to_idl(src, PACKAGE, Path(f"{name}{suffix}"), idl)
    includes = [str(prefix / "share" / d) for d in DEPENDENCIES]
    files = [f"{idl}:{name}.idl" for name in INTERFACES]
    for out, ext in _generators({"c", "py", *TYPESUPPORTS}):
        kwargs = {"type_description_files": None} if "type_description_files" in \
            inspect.signature(ext.generate).parameters else {}
        ext.generate(PACKAGE, files, includes, output_path=work / "gen" / out, **kwargs)
    headers = work / "include" / PACKAGE
    for gen in (work / "gen").iterdir():
        for h in [*gen.rglob("*.h"), *gen.rglob("*.hpp")]:
            dest = headers / h.relative_to(gen)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(h, dest)


def compile_package(work: Path, prefix: Path, out: Path) -> Path:
    """The generated sources -> shared libraries and extension modules inside out/control_msgs."""
    cc, cxx = shutil.which("gcc") or shutil.which("cc"), shutil.which("g++") or shutil.which("c++")
    if not cc or not cxx:
        raise BuildError("no C/C++ compiler found (gcc and g++ are needed)")
    import numpy

    pkg = out / PACKAGE
    lib = pkg / "lib"
    lib.mkdir(parents=True)
    gen = work / "gen"
    inc = ["-I", str(work / "include"), "-I", str(prefix / "include"), "-I", sysconfig.get_paths()["include"],
           "-I", numpy.get_include(), *[f"-I{d}" for d in sorted((prefix / "include").iterdir()) if d.is_dir()]]
    link = ["-L", str(lib), "-L", str(prefix / "lib"), f"-Wl,-rpath,{prefix / 'lib'}", "-Wl,-rpath,$ORIGIN",
            "-Wl,-rpath,$ORIGIN/lib"]

    def build(name: str, compiler: str, sources: list[Path], libs: list[str], where: Path = lib) -> None:
        flags = ["-std=c++17"] if compiler == cxx else []
        _run([compiler, "-shared", "-fPIC", "-O1", *flags, f"-Wl,-soname,{name}", "-o", str(where / name),
              *map(str, sources), *inc, *link, *[f"-l{x}" for x in libs]])

    def deps(kind: str) -> list[str]:
        return [f"{d}__rosidl_{kind}" for d in DEPENDENCIES]

    base = f"{PACKAGE}__rosidl_generator_c"
    build(f"lib{base}.so", cc, sorted((gen / "type_c").rglob("*.c")), ["rosidl_runtime_c", "rcutils",
                                                                       *deps("generator_c")])
    build(f"lib{PACKAGE}__rosidl_typesupport_introspection_c.so", cc,
          sorted((gen / "ts_introspection_c").rglob("*.c")),
          [base, "rosidl_runtime_c", "rosidl_typesupport_introspection_c", *deps("typesupport_introspection_c")])
    build(f"lib{PACKAGE}__rosidl_typesupport_fastrtps_c.so", cxx, sorted((gen / "ts_fastrtps_c").rglob("*.cpp")),
          [base, "rosidl_runtime_c", "rosidl_typesupport_fastrtps_c", "rosidl_typesupport_fastrtps_cpp", "fastcdr",
           "rmw", "rosidl_dynamic_typesupport", *deps("typesupport_fastrtps_c")])
    build(f"lib{PACKAGE}__rosidl_typesupport_c.so", cxx, sorted((gen / "ts_c").rglob("*.cpp")),
          [base, "rosidl_runtime_c", "rosidl_typesupport_c", *deps("typesupport_c")])
    py = gen / "type_py"
    build(f"lib{PACKAGE}__rosidl_generator_py.so", cc, sorted(py.glob("*/_*_s.c")),
          [base, "rosidl_runtime_c", "rcutils", *deps("generator_py"), *deps("generator_c")])
    for ts in TYPESUPPORTS:
        build(f"{PACKAGE}_s__rosidl_typesupport_{ts}.so", cc, [py / f"_{PACKAGE}_s.ep.rosidl_typesupport_{ts}.c"],
              [f"{PACKAGE}__rosidl_generator_py", f"{PACKAGE}__rosidl_typesupport_{ts}", base, "rosidl_runtime_c",
               *deps("generator_py")], where=pkg)
    for sub in ("msg", "action"):
        shutil.copytree(py / sub, pkg / sub, ignore=shutil.ignore_patterns("*.c"))
    # The typesupport dispatch dlopens its libraries by name: loaded here first, they are found by soname.
    (pkg / "__init__.py").write_text(
        '"""control_msgs (FollowJointTrajectory only), built by vla_ros.build_control_msgs."""\n'
        "import ctypes as _ctypes\nfrom pathlib import Path as _Path\n\n"
        "for _name in ('generator_c', 'typesupport_fastrtps_c', 'typesupport_introspection_c', 'typesupport_c'):\n"
        f"    _ctypes.CDLL(str(_Path(__file__).parent / 'lib' / f'lib{PACKAGE}__rosidl_{{_name}}.so'), "
        "mode=_ctypes.RTLD_GLOBAL)\n")
    return pkg


def build_control_msgs(src: str | Path, out: str | Path, prefix: str | Path = sys.prefix) -> Path:
    """Build into out/control_msgs (replacing it); returns the package directory."""
    src, out, prefix = Path(src), Path(out), Path(prefix)
    for name in INTERFACES:
        f = src / f"{name}{'.action' if name.startswith('action/') else '.msg'}"
        if not f.is_file():
            raise BuildError(f"{f} not found: --src must be control_msgs' folder with action/ and msg/")
    if not (prefix / "share" / "trajectory_msgs").is_dir():
        raise BuildError(f"{prefix} has no ROS 2 interface wheels (share/trajectory_msgs): pip install -e '.[ros]'")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".build_") as tmp:
        staging = Path(tmp) / "out"
        generate(src, Path(tmp), prefix)
        pkg = compile_package(Path(tmp), prefix, staging)
        target = out / PACKAGE
        if target.exists():
            shutil.rmtree(target)
        pkg.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vla_ros.build_control_msgs", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="control_msgs' interface folder (with action/ and msg/)")
    p.add_argument("--out", required=True, help="where the control_msgs package goes (add it to PYTHONPATH)")
    a = p.parse_args(argv)
    try:
        pkg = build_control_msgs(a.src, a.out)
    except (BuildError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"built {pkg}; use it with: export PYTHONPATH={pkg.parent}:$PYTHONPATH")
    return 0


if __name__ == "__main__":
    sys.exit(main())
