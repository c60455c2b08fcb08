"""The Linux plumbing under the host harness (cluster/hosts.py): root-namespace commands, network
namespaces and their cables, the freezer cgroups, the hosts' init (pid 1) and what a run leaves behind.

Functions of names and paths only; which host is where, the cluster's state file and Ray live in
cluster/host_cluster.py. `python -m cluster.netns _init SPEC` is a host's init (started by `start_init`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from nanochat.errors import NanochatError

PREFIX = "nch-"  # every namespace and cgroup of the harness starts with it
BASE = Path("/var/tmp/nanochat-hosts")  # state files <id>.json and directories <id>/
FREEZER = Path("/sys/fs/cgroup/freezer")
REPO_ROOT = Path(__file__).resolve().parent.parent
CMD_TIMEOUT_S = 60.0  # any single ip/nft/tc/mount command


class HostError(NanochatError, RuntimeError):
    """The harness cannot do what was asked (not root, a tool missing, a host that does not exist...)."""


def sh(*cmd: str, check: bool = True, timeout: float = CMD_TIMEOUT_S, input: str | None = None) -> str:
    """Run a root-namespace command (ip, nft, ...) under a timeout; its stdout."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired:
        raise HostError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f}s") from None
    if check and out.returncode != 0:
        raise HostError(f"`{' '.join(cmd)}` failed (exit {out.returncode}): {out.stderr.strip()}")
    return out.stdout


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children(pid: int) -> list[int]:
    try:
        text = " ".join(p.read_text() for p in Path(f"/proc/{pid}/task").glob("*/children"))
    except OSError:
        return []
    return [int(x) for x in text.split()]


def netns_list() -> list[str]:
    """Names of the network namespaces `ip netns` knows."""
    return [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()]


def root_network() -> dict[str, list[str]]:
    """The root namespace's links and addresses (what the harness must never change), and its
    nftables tables."""
    links = sorted(line.split()[0] for line in sh("ip", "-br", "link").splitlines() if line.strip())
    addrs = sorted(" ".join(line.split()[:1] + line.split()[2:])
                   for line in sh("ip", "-br", "addr").splitlines())
    tables = sorted(sh("nft", "list", "tables", check=False).splitlines()) if shutil.which("nft") else []
    routes = sorted(sh("ip", "route").splitlines())
    return {"links": links, "addresses": addrs, "routes": routes, "nft_tables": tables}


def check_requirements() -> None:
    """Root, the tools and the freezer, or a HostError that says what is missing."""
    if os.geteuid() != 0:
        raise HostError("the host harness needs root (network namespaces, cgroups): run it as root")
    missing = [t for t in ("ip", "unshare", "nsenter", "nft", "tc", "mount") if shutil.which(t) is None]
    if missing:
        raise HostError(f"missing tools: {', '.join(missing)} "
                        "(Debian: apt-get install iproute2 util-linux nftables)")
    if not (FREEZER / "cgroup.procs").exists():
        raise HostError(f"no cgroup v1 freezer at {FREEZER}: freezing hosts needs it")


def kill(pid: int) -> None:
    """SIGKILL `pid` if it still exists."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------- network

def add_switch(switch_ns: str) -> None:
    """A namespace holding the bridge br0 that every host's cable plugs into."""
    sh("ip", "netns", "add", switch_ns)
    sh("ip", "-n", switch_ns, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", switch_ns, "link", "set", "br0", "up")


def add_cabled_ns(ns: str, switch_ns: str, port: str, cidr: str) -> None:
    """Network namespace `ns` whose eth0 (address `cidr`) is cabled to port `port` of the switch's br0."""
    sh("ip", "netns", "add", ns)
    sh("ip", "-n", switch_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "-n", switch_ns, "link", "set", port, "master", "br0", "up")
    sh("ip", "-n", ns, "addr", "add", cidr, "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")


def shape(ns: str, dev: str, rate: str) -> None:
    """Token-bucket bandwidth limit (tc tbf) on `dev` of `ns`, e.g. rate="1mbit"; "0" removes it."""
    if rate in ("0", "", "none"):
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
    else:
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
           "burst", "32kbit", "latency", "400ms")


def drop_random(ns: str, percent: float) -> None:
    """Drop `percent` % of the packets of `ns`'s eth0 at random, both ways (an nftables table in the
    namespace); 0 removes it."""
    sh("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "nch_drop", check=False)
    if percent > 0:
        share = min(10_000, int(round(percent * 100)))  # in 1/100 %: numgen's modulus must exceed it
        match = "" if share >= 10_000 else f"numgen random mod 10000 < {share} "
        rules = (f"table inet nch_drop {{\n"
                 f" chain input {{ type filter hook input priority 0; iifname \"eth0\" {match}drop; }}\n"
                 f" chain output {{ type filter hook output priority 0; oifname \"eth0\" {match}drop; }}\n"
                 f"}}\n")
        sh("ip", "netns", "exec", ns, "nft", "-f", "-", input=rules)


# ----------------------------------------------------------------------------- freezer cgroups

def cgroup_pids(cg: Path) -> list[int]:
    """Pids (root namespace) of every process of cgroup `cg`."""
    try:
        return [int(p) for p in (cg / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def kill_cgroup(cg: Path) -> None:
    """SIGKILL every process of `cg` (including nsenter'd commands outside a PID namespace's tree) and
    wait up to 30 s until none is left."""
    if not cg.exists():
        return
    for pid in cgroup_pids(cg):
        kill(pid)
    (cg / "freezer.state").write_text("THAWED")  # a frozen process dies only once thawed
    deadline = time.time() + 30
    while cgroup_pids(cg) and time.time() < deadline:
        time.sleep(0.05)


def rmdir_cgroup(cg: Path) -> None:
    if not cg.exists():
        return
    try:
        (cg / "freezer.state").write_text("THAWED")
    except OSError:
        pass
    deadline = time.time() + 30
    while True:
        try:
            for pid in (cg / "cgroup.procs").read_text().split():
                kill(int(pid))
            cg.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.time() > deadline:
                raise HostError(f"cgroup {cg} still holds processes after 30 s") from None
            time.sleep(0.1)


def harness_leftovers() -> list[str]:
    """Whatever of any harness run still exists: namespaces, cgroups, state files, directories, processes
    running inside a harness namespace (empty when all is clean)."""
    left = [f"netns {n}" for n in netns_list() if n.startswith(PREFIX)]
    left += [f"cgroup {c.name}" for c in FREEZER.glob(f"{PREFIX}*")] if FREEZER.is_dir() else []
    left += [f"path {p}" for p in BASE.iterdir()] if BASE.is_dir() else []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"cluster.netns\0_init" in cmd:
                left.append(f"process {proc.name} {cmd[:80]!r}")
    return left


# ----------------------------------------------------------------------------- the host's init

def start_init(name: str, ns: str, spec: dict, cg: Path, log_path: Path, deadline: float) -> int:
    """Start host `name`'s init (`_init`: pid 1 of new PID, UTS and mount namespaces, inside network
    namespace `ns` and freezer cgroup `cg`); its pid (root namespace) once its mounts are made."""
    ready = Path(spec["ready"])
    ready.unlink(missing_ok=True)
    cgroup_procs = str(cg / "cgroup.procs")
    log = open(log_path, "ab")  # noqa: SIM115 (kept by the child only)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, "unshare", "--pid", "--fork", "--mount-proc", "--uts", "--mount",
         "--propagation", "private", sys.executable, "-m", "cluster.netns", "_init", json.dumps(spec)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO_ROOT, start_new_session=True,
        env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "PYTHONPATH": str(REPO_ROOT)},
        preexec_fn=lambda: Path(cgroup_procs).write_text(str(os.getpid())))
    log.close()
    while time.time() < deadline:
        kids = _children(proc.pid)
        if kids and ready.exists() and ready.read_text() == "ready":
            return kids[0]
        if proc.poll() is not None:
            raise HostError(f"host {name}: its init exited ({proc.returncode}); see {log_path}")
        time.sleep(0.05)
    raise HostError(f"host {name} did not come up in time")


def _init(spec: dict) -> None:
    """pid 1 of a host: hostname, mounts, then reap orphans until killed."""
    ready = open(spec["ready"], "w")  # noqa: SIM115 (opened before /var/tmp is hidden)
    socket.sethostname(spec["hostname"])
    for src, dest in spec["binds"]:
        subprocess.run(["mount", "--rbind", src, dest], check=True, timeout=30)  # with the mounts below src
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "shm", "/dev/shm"], check=True, timeout=30)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "hidden", spec["hide"]], check=True, timeout=30)
    ready.write("ready")
    ready.close()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(0.5)


if __name__ == "__main__" and sys.argv[1:2] == ["_init"]:
    _init(json.loads(sys.argv[2]))
