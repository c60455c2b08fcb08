#!/usr/bin/env bash
# Install what nanochat/sandbox.py needs on Debian/Ubuntu: bubblewrap (namespaces for model-written
# code) and a system python3 (an interpreter under /usr that the sandbox user 65534 can run; the
# project's own Python often lives under /root or a home dir it cannot reach).
# Idempotent and fast when both are present. Run: sudo scripts/install_sandbox_deps.sh
# Called by `make env`. Without root (and no passwordless sudo) it warns and exits 0: the sandbox
# then runs in its degraded "plain" mode and says so at start-up.
set -euo pipefail

if command -v bwrap >/dev/null 2>&1 && [ -x /usr/bin/python3 ]; then
    echo "sandbox deps: bubblewrap $(bwrap --version | awk '{print $2}') and /usr/bin/python3 already installed"
else
    if [ "$(id -u)" -eq 0 ]; then
        as_root=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root=(sudo -n)
    else
        echo "WARNING: sandbox deps missing (bubblewrap and/or /usr/bin/python3) and no root to install them." >&2
        echo "  Run as root: apt-get install -y --no-install-recommends bubblewrap python3" >&2
        echo "  Until then nanochat/sandbox.py runs model code WITHOUT namespace isolation." >&2
        exit 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "ERROR: apt-get not found; install bubblewrap and python3 with this system's package manager." >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${as_root[@]}" apt-get update -qq
    "${as_root[@]}" apt-get install -y -qq --no-install-recommends bubblewrap python3 >/dev/null
    echo "sandbox deps: installed bubblewrap $(bwrap --version | awk '{print $2}') and python3"
fi

# Smoke test: can an unprivileged user create the namespaces? (Some kernels and AppArmor profiles
# forbid unprivileged user namespaces; the sandbox then falls back to "plain" mode.)
probe=(bwrap --unshare-all --unshare-user --die-with-parent --ro-bind /usr /usr
       --symlink usr/lib /lib --symlink usr/lib64 /lib64 --symlink usr/bin /bin -- /usr/bin/python3 -c pass)
if [ "$(id -u)" -eq 0 ] && command -v setpriv >/dev/null 2>&1; then
    probe=(setpriv --reuid=65534 --regid=65534 --clear-groups "${probe[@]}")
fi
if err=$("${probe[@]}" 2>&1); then
    echo "sandbox deps: bubblewrap namespaces work here"
else
    echo "WARNING: bubblewrap cannot create namespaces here: ${err}" >&2
    echo "  Enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 or the" >&2
    echo "  AppArmor userns policy) or the sandbox runs in its degraded plain mode." >&2
fi
