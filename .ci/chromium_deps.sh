#!/bin/sh
# .ci/chromium_deps.sh — install Debian's headless-capable Chromium (run as root) for
# tests/test_html_report.py, which opens `attnproto report --html`'s page in it and checks
# that it renders and that every image loads. Idempotent: returns at once when installed.
set -eu

PACKAGES="chromium"

missing=""
for pkg in $PACKAGES; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing="$missing $pkg"
  fi
done

if [ -z "$missing" ]; then
  echo "chromium_deps: all present ($PACKAGES)"
  exit 0
fi

echo "chromium_deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing
