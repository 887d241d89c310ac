#!/usr/bin/env bash
# Make sure Debian's Chromium is present for tests/test_browser.py (Playwright drives it).
# Quick and silent when /usr/bin/chromium already exists. Never runs `playwright install`:
# that downloads its own browser build and fails on offline machines.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "setup_browser.sh: $CHROMIUM is missing and this user cannot install packages." >&2
    echo "  Install it as root:  apt-get update && apt-get install -y chromium" >&2
    echo "  (or set USERLAB_SKIP_BROWSER=1 outside CI to skip the browser test)" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_browser.sh: $CHROMIUM is missing and apt-get is not available;" >&2
    echo "  install Chromium with your package manager so that $CHROMIUM exists." >&2
    exit 1
fi

echo "setup_browser.sh: installing Debian's chromium (for the browser test) ..."
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium

if [ ! -x "$CHROMIUM" ]; then
    echo "setup_browser.sh: apt-get finished but $CHROMIUM is still missing." >&2
    exit 1
fi
echo "setup_browser.sh: $("$CHROMIUM" --version 2>/dev/null || echo chromium) ready."
