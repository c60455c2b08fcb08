#!/usr/bin/env bash
# What the host harness (cluster/hosts.py: real hosts in Linux namespaces) needs on Debian/Ubuntu:
# iproute2 (ip, tc), util-linux (unshare, nsenter, mount) and nftables (packet drop).
#
#   scripts/install_hosts_deps.sh      # run by `make env`; idempotent, instant when installed
#
# Installs only as root (or through passwordless sudo); otherwise prints the command to run and
# exits 0, and the host tests skip themselves saying what is missing.
set -euo pipefail

if command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 && command -v nft >/dev/null 2>&1 \
    && command -v unshare >/dev/null 2>&1 && command -v nsenter >/dev/null 2>&1; then
    exit 0
fi

packages=(iproute2 util-linux nftables)
if ! command -v apt-get >/dev/null 2>&1; then
    echo "[hosts-deps] no apt-get here: install ${packages[*]} by hand for the host tests" >&2
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    sudo_cmd=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo_cmd=(sudo -n)
else
    echo "[hosts-deps] not root: run 'sudo apt-get install -y ${packages[*]}' for the host tests" >&2
    exit 0
fi

echo "[hosts-deps] installing ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "[hosts-deps] $(nft --version)"
