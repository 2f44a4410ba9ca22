#!/usr/bin/env bash
# tests/test_report_browser.py opens report.html in a real headless Chromium: install Debian's
# chromium and chromium-driver when they are missing (as root, or through sudo).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
echo "installing chromium and chromium-driver (Debian packages) for the report's browser test"
$SUDO apt-get update -q && $SUDO apt-get install -y -q chromium chromium-driver
