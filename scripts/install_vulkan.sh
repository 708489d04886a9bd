#!/usr/bin/env bash
# Make sure SAPIEN (ManiSkill's renderer) finds a Vulkan device.
# A GPU driver's ICD is used when present; otherwise Mesa's lavapipe (CPU) is installed.
# Debian 12's own Mesa 22.3 lavapipe lacks VK_KHR_external_semaphore_fd, which SAPIEN needs,
# so on bookworm it comes from bookworm-backports (see shared ENVIRONMENT.md).
set -euo pipefail

have_gpu_icd() {
  ls /usr/share/vulkan/icd.d/nvidia_icd*.json /etc/vulkan/icd.d/nvidia_icd*.json >/dev/null 2>&1
}

mesa_major() {
  dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null | sed -E 's/^([0-9]+:)?([0-9]+).*/\2/' || true
}

if have_gpu_icd; then
  echo "vulkan: NVIDIA ICD present, nothing to install"
  exit 0
fi
major=$(mesa_major)
if [ -n "$major" ] && [ "$major" -ge 24 ] && dpkg-query -W libvulkan1 >/dev/null 2>&1; then
  echo "vulkan: mesa-vulkan-drivers $major.x (lavapipe) already installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
. /etc/os-release
export DEBIAN_FRONTEND=noninteractive
if [ "${ID:-}" = debian ] && [ "${VERSION_CODENAME:-}" = bookworm ]; then
  uri=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 | awk '{print $2}')
  if [ -z "$uri" ]; then
    uri=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | grep -v security | head -n1 | awk '{print $2}')
  fi
  uri=${uri:-http://deb.debian.org/debian}
  echo "deb $uri bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/vla-bookworm-backports.list >/dev/null
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers libvulkan1 >/dev/null
else
  # Ubuntu 24.04 and newer Debian ship a Mesa recent enough for SAPIEN.
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi
echo "vulkan: installed mesa-vulkan-drivers $(dpkg-query -W -f='${Version}' mesa-vulkan-drivers)"
