#!/usr/bin/env bash
# Install everything the test suite needs and run it: the README's test command, and what CI runs.
#   bash tools/test.sh [pytest args...]
# System packages: Debian's chromium + chromium-driver for the playground's browser test
# (installed with apt-get when missing: as root, or through sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
pip install -q torch==2.13.0   # the CPU build; a bare torch requirement would pull a CUDA build
pip install -q -e ".[test]"
python -m pytest -q "$@"
