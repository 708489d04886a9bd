#!/usr/bin/env bash
# Offline wheelhouse for an air-gapped GPU box, and its installer.
#
# On a machine with package access (any OS Python with pip; --python picks the wheels' Python):
#   scripts/wheelhouse.sh --python 3.12 --out DIR [--no-trim] [--with-image-deps] [--physx-gpu FILE]
# downloads the wheels of scripts/gpu_wheelhouse.txt (what a stock PyTorch-CUDA image lacks; never torch) for
# CPython 3.12 on manylinux x86-64, trims ManiSkill and SAPIEN to the tabletop tasks (scripts/trim_wheels.py), writes
# DIR/requirements.txt and reports the bundle's size with the project's files against the 60 MiB of one transfer.
# --with-image-deps adds the image packages marked "+" in scripts/gpu_image_packages.txt (a barer image; large).
# --physx-gpu FILE: SAPIEN's PhysX GPU library (linux-so.zip or libPhysXGpu_64.so), which SAPIEN otherwise
# downloads from GitHub at first physx_cuda use; without it the script tries that download itself.
#
# On the GPU box (no network; the Python that holds torch, or $PYTHON):
#   scripts/wheelhouse.sh --install DIR --target SITE
# installs the wheels into SITE with pip --no-index --no-deps (the system's torch and numpy are never touched; put
# SITE on PYTHONPATH) and puts the PhysX GPU library where SAPIEN looks for it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
py=${PYTHON:-python3}
# SAPIEN 3.0.3's PhysX build (sapien.physx.version()): the folder under ~/.sapien/physx and the release to fetch.
physx_version=105.1-physx-5.3.1.patch0
physx_url=https://github.com/sapien-sim/physx-precompiled/releases/download/$physx_version/linux-so.zip
budget_mib=60

die() { echo "wheelhouse: $*" >&2; exit 2; }

python_version="" out="" trim=1 image_deps=0 physx="" install="" target=""
while [ $# -gt 0 ]; do
  case $1 in
    --python) python_version=${2:?}; shift 2 ;;
    --out) out=${2:?}; shift 2 ;;
    --no-trim) trim=0; shift ;;
    --with-image-deps) image_deps=1; shift ;;
    --physx-gpu) physx=${2:?}; shift 2 ;;
    --install) install=${2:?}; shift 2 ;;
    --target) target=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

if [ -n "$install" ]; then
  [ -n "$target" ] || die "--install needs --target SITE"
  [ -f "$install/requirements.txt" ] || die "$install is not a wheelhouse (no requirements.txt): build it with --out"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --find-links "$install/wheels" \
    --target "$target" -r "$install/requirements.txt"
  if [ -f "$install/physx/$physx_version/libPhysXGpu_64.so" ]; then
    mkdir -p "$HOME/.sapien/physx/$physx_version"
    cp "$install/physx/$physx_version/libPhysXGpu_64.so" "$HOME/.sapien/physx/$physx_version/"
  fi
  echo "wheelhouse: installed $(grep -c . "$install/requirements.txt") packages into $target"
  exit 0
fi

[ -n "$python_version" ] && [ -n "$out" ] || die "give --python X.Y and --out DIR (or --install DIR --target SITE)"
[[ $python_version =~ ^3\.[0-9]+$ ]] || die "--python takes X.Y, e.g. 3.12"
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then die "--out $out exists and is not empty"; fi
mkdir -p "$out/wheels"

# The pins, without comments; with --with-image-deps also the image packages marked "+".
reqs=$(sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$here/gpu_wheelhouse.txt" | grep -v '^$')
if [ "$image_deps" = 1 ]; then
  reqs+=$'\n'$(sed -n '/^\[image\]/,/^\[/p' "$here/gpu_image_packages.txt" | grep ' +$' | sed 's/ +$//')
fi
printf '%s\n' "$reqs" > "$out/requirements.txt"

abi=cp${python_version/./}
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  --abi "$abi" --abi abi3 --abi none "${platforms[@]}" -d "$out/wheels" -r "$out/requirements.txt"
if ls "$out/wheels" | grep -qi '^torch-'; then die "a torch wheel was downloaded: the GPU box keeps its own"; fi

if [ "$trim" = 1 ]; then
  "$py" "$here/trim_wheels.py" --report "$out/TRIMMED.txt" "$out"/wheels/mani_skill-*.whl "$out"/wheels/sapien-*.whl
fi

mkdir -p "$out/physx/$physx_version"
so="$out/physx/$physx_version/libPhysXGpu_64.so"
if [ -z "$physx" ] && curl -fsSL --max-time 120 -o "$out/physx/linux-so.zip" "$physx_url" 2>/dev/null; then
  physx="$out/physx/linux-so.zip"
fi
if [ -n "$physx" ]; then
  case $physx in
    *.zip) "$py" -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read(
"libPhysXGpu_64.so"))' "$physx" "$so" ;;
    *) cp "$physx" "$so" ;;
  esac
  rm -f "$out/physx/linux-so.zip"
else
  rmdir "$out/physx/$physx_version" "$out/physx"
  echo "wheelhouse: no PhysX GPU library (GitHub unreachable, no --physx-gpu): physx_cuda will need" \
       "~/.sapien/physx/$physx_version/libPhysXGpu_64.so on the GPU box (docs/gpu.md)" >&2
fi

bundle=$(du -sb "$out" | cut -f1)
project=$(cd "$root" && git ls-files -z 2>/dev/null | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1 || echo 0)
total=$(( (bundle + project) / 1048576 ))
echo "wheelhouse: $(ls "$out/wheels" | wc -l) wheels in $out: $((bundle / 1048576)) MiB; with the project's files" \
     "$total MiB (budget $budget_mib MiB for one transfer)"
if [ "$total" -ge "$budget_mib" ]; then
  echo "wheelhouse: over the $budget_mib MiB budget: carry the PhysX library or the image deps separately" >&2
fi
