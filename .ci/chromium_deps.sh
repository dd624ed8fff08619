#!/bin/sh
# .ci/chromium_deps.sh — install Debian's headless-capable Chromium (run as root) for
# tests/test_html_report.py, which opens `attnproto report --html`'s page in it and checks
# that it renders and that every image loads. Idempotent: returns at once when installed.
set -eu
exec sh "$(dirname "$0")/debian_packages.sh" chromium_deps chromium
