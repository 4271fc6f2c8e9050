#!/bin/sh
# Install Debian's headless-capable Chromium for tests/test_ui_browser.py (CI runs as root).
# Idempotent: does nothing when a chromium binary is already on the machine.
set -eu
if [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; then
  echo "chromium present: $(command -v chromium || echo /usr/bin/chromium)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "chromium is missing; run as root (or: sudo $0)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
/usr/bin/chromium --version
