#!/bin/sh
# .ci/debian_packages.sh NAME PACKAGE... — install the Debian packages that are missing (run as
# root; idempotent: returns at once when all are installed). NAME labels the messages. Used by
# .ci/metal_deps.sh and .ci/chromium_deps.sh, which say what each package is for.
set -eu

name=$1
shift
missing=""
for pkg in "$@"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing="$missing $pkg"
  fi
done

if [ -z "$missing" ]; then
  echo "$name: all present ($*)"
  exit 0
fi

echo "$name: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing
