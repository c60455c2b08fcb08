#!/usr/bin/env bash
# Headless Chromium + chromedriver for the web page test (tests/test_serve_web.py).
#
#   scripts/install_browser_deps.sh      # run by `make env`; idempotent, instant when installed
#
# Debian 12 packages `chromium` and `chromium-driver` (matching versions, no CDN downloads).
# Installs only as root (or through passwordless sudo); otherwise prints the command to run and
# exits 0, and the browser test skips itself with the same hint.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi

packages=(chromium chromium-driver)
if ! command -v apt-get >/dev/null 2>&1; then
    echo "[browser-deps] no apt-get here: install ${packages[*]} (or Chrome + chromedriver) by hand" >&2
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    sudo_cmd=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo_cmd=(sudo -n)
else
    echo "[browser-deps] not root: run 'sudo apt-get install -y ${packages[*]}' for the browser test" >&2
    exit 0
fi

echo "[browser-deps] installing ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
# a fresh container has no package lists; an old list may point at versions gone from the mirror
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
command -v chromium >/dev/null && command -v chromedriver >/dev/null
echo "[browser-deps] $(chromium --version 2>/dev/null | head -1); $(chromedriver --version | head -1)"
