#!/bin/sh
# .ci/metal_deps.sh — install what tools/metal_check needs on Debian 12 (run as root):
#   clang-19      clang++ >= 17 for the MSL stand-in (_Float16 and arithmetic __bf16 on x86-64)
#                 and for the Objective-C++ host check
#   g++           the second C++ front end for the shader check
#   libgnustep-base-dev  GNUstep Foundation headers (+ GCC's objc runtime headers)
# Idempotent: returns at once when everything is already installed.
set -eu

PACKAGES="clang-19 g++ libgnustep-base-dev"

missing=""
for pkg in $PACKAGES; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing="$missing $pkg"
  fi
done

if [ -z "$missing" ]; then
  echo "metal_deps: all present ($PACKAGES)"
  exit 0
fi

echo "metal_deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing
