#!/bin/sh
# .ci/metal_deps.sh — install what tools/metal_check needs on Debian 12 (run as root):
#   clang-19      clang++ >= 17 for the MSL stand-in (_Float16 and arithmetic __bf16 on x86-64)
#                 and for the Objective-C++ host check
#   g++           the second C++ front end for the shader check
#   libgnustep-base-dev  GNUstep Foundation headers (+ GCC's objc runtime headers)
# Idempotent: returns at once when everything is already installed.
set -eu

exec sh "$(dirname "$0")/debian_packages.sh" metal_deps clang-19 g++ libgnustep-base-dev
