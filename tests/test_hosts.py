"""The host harness (cluster/hosts.py, host_cluster.py, netns.py) without Ray: separate hosts, failures, cleanup.

Each host is a network + PID + UTS + mount namespace; these tests check what makes them hosts
(own address and hostname, private /tmp and HOME, one shared mount, no route out), each failure
operation (kill, cut/restore, limit, drop, freeze/thaw), and that nothing of the harness remains
after, also after a crashed run, with the root namespace's links and addresses unchanged.
Needs root, iproute2, util-linux, nftables and the cgroup v1 freezer (skipped otherwise).

Run: PYTHONPATH=. python -m pytest tests/test_hosts.py -q
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from cluster import hosts, netns
from cluster.host_cluster import HostCluster
from cluster.netns import HostError, harness_leftovers, root_network

REPO_ROOT = netns.REPO_ROOT


def _harness_available() -> str | None:
    try:
        netns.check_requirements()
    except HostError as e:
        return str(e)
    return None


pytestmark = [pytest.mark.hosts, pytest.mark.skipif(_harness_available() is not None,
                                                    reason=f"host harness unavailable: {_harness_available()}")]

# a tiny TCP echo server and client, run on the hosts (no curl/ping needed there)
SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000)); s.listen()
while True:
    c, _ = s.accept(); c.sendall(c.recv(100) + b"@" + socket.gethostname().encode()); c.close()
"""
CLIENT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], 7000), timeout=float(sys.argv[2]))
    s.sendall(b"hi"); print(s.recv(100).decode())
except OSError as e:
    print("FAIL", type(e).__name__)
"""


def ask(hc: HostCluster, src: str, dst_ip: str, timeout: float = 15.0) -> str:
    return hc.run(src, [sys.executable, "-c", CLIENT, dst_ip, str(timeout)], timeout=60).stdout.strip()


@contextmanager
def nothing_left_behind() -> Iterator[None]:
    """After the block: the root namespace's links, addresses, routes and nftables tables as before,
    and nothing of the harness that was not there before (another user's cluster may be up)."""
    network, left = root_network(), set(harness_leftovers())
    yield
    assert root_network() == network
    assert set(harness_leftovers()) - left == set()


@pytest.fixture
def clean_machine():
    with nothing_left_behind():
        yield



def test_the_log_tails_of_a_failed_start_come_from_the_hosts_newest_session():
    """session_latest is an absolute link into the host's own /tmp: read from here it points nowhere,
    so the tails come from the newest session directory (a failed start once printed no logs)."""
    hc = HostCluster(id=f"logtails{os.getpid()}")
    ray_dir = hc.host_dir("head") / "tmp" / "ray"
    try:
        for name, text in [("session_2026-12-07_10-00-00_1", "older"), ("session_2026-12-07_11-00-00_2", "newest")]:
            (ray_dir / name / "logs").mkdir(parents=True)
            (ray_dir / name / "logs" / "dashboard_MetricsHead.log").write_text(f"{text}: why it died\n")
        os.symlink("/tmp/ray/session_2026-12-07_11-00-00_2", ray_dir / "session_latest")
        tails = hc.ray_log_tails("head")
        assert "newest: why it died" in tails and "older" not in tails
    finally:
        shutil.rmtree(hc.dir, ignore_errors=True)

def test_hosts_are_separate_machines_and_failures_work(clean_machine, tmp_path):
    with HostCluster.create(workers=2) as hc:
        w1, head = hc.host("w1"), hc.host("head")
        assert len({h.ip for h in hc.hosts.values()}) == 4
        # hostname, address, no default route, HOME with the token (0600), private /tmp, shared /srv
        probe = ("hostname; ip -br -4 addr show eth0; ip route; echo HOME=$HOME; stat -c %a ~/.ray/auth_token; "
                 "touch /tmp/mine /srv/from-$(hostname); ls /tmp /srv; ls /var/tmp/nanochat-hosts")
        out1 = hc.run("w1", ["sh", "-c", probe]).stdout.split()
        assert out1[0] == "nch-w1" and w1.ip + "/24" in out1 and "default" not in out1
        assert "HOME=/home/nanochat" in out1 and "600" in out1
        assert (hc.host_dir("w1") / "home/nanochat/.ray/auth_token").read_text() == hc.token
        out2 = hc.run("w2", ["sh", "-c", "ls /tmp; ls /srv"]).stdout.split()
        assert "mine" not in out2 and {"from-nch-w1"} <= set(out2)  # /tmp is private, /srv shared
        assert sorted(p.name for p in hc.shared.iterdir()) == ["from-nch-w1"]
        assert "nanochat-hosts" not in out1 and hc.id not in out1  # the harness's directory is hidden
        # /etc/hosts names the cluster's hosts; the process table is the host's own
        assert hc.run("w2", ["getent", "hosts", "nch-w1"]).stdout.split()[0] == w1.ip
        assert hc.run("w2", ["sh", "-c", "ps -e -o pid= | wc -l"]).stdout.strip() in ("3", "4", "5")
        # nothing outside the namespaces is reachable
        unreach = hc.run("w1", [sys.executable, "-c", CLIENT, "192.0.2.2", "2"]).stdout
        assert unreach.startswith("FAIL")

        server = hc.popen("w1", [sys.executable, "-c", SERVER])
        deadline = time.time() + 30
        while not ask(hc, "client", w1.ip).startswith("hi@") and time.time() < deadline:
            time.sleep(0.3)
        assert ask(hc, "client", w1.ip) == "hi@nch-w1"

        hc.cut("w1")  # cable out: no answer; back in: answers again (the server never stopped)
        assert ask(hc, "client", w1.ip, 2).startswith("FAIL")
        assert "cable cut" in hc.status()
        hc.restore("w1")
        assert ask(hc, "client", w1.ip) == "hi@nch-w1"

        hc.drop("w1", 100)  # every packet dropped, then none
        assert ask(hc, "client", w1.ip, 2).startswith("FAIL")
        hc.drop("w1", 0)
        assert ask(hc, "client", w1.ip) == "hi@nch-w1"
        with pytest.raises(HostError, match="0..100"):
            hc.drop("w1", 150)

        hc.limit("w1", "1mbit")  # a token bucket both ways; traffic still flows
        qdisc = subprocess.run(["ip", "netns", "exec", hc.ns("w1"), "tc", "qdisc", "show", "dev", "eth0"],
                               capture_output=True, text=True).stdout
        assert "tbf" in qdisc and "1Mbit" in qdisc
        assert ask(hc, "client", w1.ip) == "hi@nch-w1"
        hc.limit("w1", "0")

        hc.freeze("w1")  # frozen: the connection is accepted by the kernel but nobody answers
        assert hc.status().count("frozen") == 1
        assert ask(hc, "client", w1.ip, 2).startswith("FAIL")
        hc.thaw("w1")
        assert ask(hc, "client", w1.ip) == "hi@nch-w1"

        before = hc.processes("w1")
        assert server.pid in before and len(before) >= 3
        hc.kill("w1")  # every process at once, its namespace and cable gone
        assert server.wait(timeout=30) == -signal.SIGKILL
        assert hc.processes("w1") == [] and hc.ns("w1") not in netns.netns_list()
        assert ask(hc, "client", w1.ip, 2).startswith("FAIL")
        with pytest.raises(HostError, match="w1 is down"):
            hc.run("w1", ["true"])
        hc.restart("w1", start_ray=False)  # a fresh host: same address, empty /tmp, the token again
        in_tmp = int(netns.REPO_ROOT.resolve().is_relative_to("/tmp"))  # a clone under /tmp is mounted there
        assert hc.run("w1", ["sh", "-c", "ls /tmp | wc -l; cat ~/.ray/auth_token"]).stdout.split() == [
            str(in_tmp), hc.token]

        other = hc.add_host("rogue", token="none")
        assert other.ip not in {h.ip for h in hc.hosts.values() if h is not other}
        assert hc.run("rogue", ["sh", "-c", "ls ~/.ray"]).stdout.strip() == ""
        assert head.ip and hc.state_file.exists()
    assert not hc.state_file.exists()


CRASHER = """
import os, sys
from cluster.host_cluster import HostCluster
hc = HostCluster.create(workers=1)
print(hc.id, flush=True)
os.kill(os.getpid(), 9)  # crash without any cleanup
"""


def test_a_crashed_run_is_cleaned_up_by_the_next_start(clean_machine):
    out = subprocess.run([sys.executable, "-c", CRASHER], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == -signal.SIGKILL
    crashed = out.stdout.split()[0]
    left = harness_leftovers()
    assert any(crashed in x for x in left) and any(x.startswith("netns") for x in left)
    with HostCluster.create(workers=0) as hc:  # the next start finds and removes the crashed one
        assert not any(crashed in x for x in harness_leftovers())
        assert hc.id != crashed


INTERRUPTED = """
import time
from cluster.host_cluster import HostCluster
with HostCluster.create(workers=1) as hc:
    hc.popen("w1", ["sleep", "600"])
    print(hc.id, flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_cleans_up_at_once(clean_machine, sig):
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    cluster_id = proc.stdout.readline().strip()
    assert cluster_id and any(cluster_id in x for x in harness_leftovers())
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert not any(cluster_id in x for x in harness_leftovers())  # removed by the process itself, not a later start


def test_cli_up_status_and_bad_input(clean_machine, capsys):
    assert hosts.main(["--cluster", "clitest", "up", "--workers", "1", "--no-ray"]) == 0
    try:
        assert hosts.main(["--cluster", "clitest", "up", "--workers", "1", "--no-ray"]) == 2  # already up
        assert "already up" in capsys.readouterr().err
        assert hosts.main(["--cluster", "clitest", "cut", "w9"]) == 2
        assert "no host 'w9'" in capsys.readouterr().err
        assert hosts.main(["--cluster", "clitest", "drop", "w1", "--percent", "-3"]) == 2
        assert hosts.main(["--cluster", "Bad-Id", "up"]) == 2
        assert "lowercase letters or digits" in capsys.readouterr().err
        with pytest.raises(HostError, match="host name 'a-very-long-host-name'"):
            HostCluster.load("clitest").add_host("a-very-long-host-name")
        assert hosts.main(["--cluster", "clitest", "status"]) == 0
        assert "w1" in capsys.readouterr().out
    finally:
        assert hosts.main(["--cluster", "clitest", "down"]) == 0
    assert hosts.main(["--cluster", "clitest", "status"]) == 2
    assert "no host cluster 'clitest'" in capsys.readouterr().err
