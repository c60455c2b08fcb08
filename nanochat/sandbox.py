"""Python sandbox: run untrusted, model-written code for real, one process tree per call.

The model's tool is Python. Each `Sandbox.run(code)` starts a fresh interpreter and tears the
whole process tree down afterwards. Notable:
- two modes, picked by probing at construction (`sandbox_capabilities()` reports what is active):
  * "bwrap": bubblewrap puts the code in its own user, pid, net, ipc, uts and mount namespaces,
    as uid 65534 when we are root; the filesystem is /usr read-only plus a size-capped tmpfs at
    /tmp (the working dir and $HOME), so ~/.ray/auth_token, the raylet socket in /tmp/ray and
    every other host file are simply absent; leaving the call tears the pid namespace down.
  * "plain" (bwrap missing or not usable): setuid to 65534 when root, a fresh session killed with
    killpg, a private temp dir; host files are protected by file modes only. Logged loudly.
- in both modes the child sets rlimits (address space, CPU seconds, file size, processes, open
  files, no core) and installs a seccomp filter (hand-built BPF via prctl) that refuses sockets,
  ptrace, mount, namespaces, setsid/setpgid (so killpg reaches every descendant), keyrings, bpf,
  io_uring and module/kexec calls. Python gets EPERM, so the model sees a normal exception.
- the environment is scrubbed (no RAY_*, cloud credentials, tokens), stdin is empty, stdout and
  stderr are capped, and a wall-clock timeout kills everything with SIGKILL.
- REPL semantics: the value of a trailing expression is returned, rendered by `render_value`:
  a float that is integral shows as an int (GSM8K writes <<48/2=24>>, so 24 not 24.0), any other
  float is rounded to 10 significant digits (0.1+0.2 -> 0.3), also inside lists/tuples/dicts.

Known limits: no cgroup, so memory is bounded per process (RLIMIT_AS x RLIMIT_NPROC in total);
model code runs in the same process as the child's bookkeeping, so it could forge its own result;
in "plain" mode world-writable host dirs (/tmp, /dev/shm) stay writable to uid 65534.

This file is also the child: `python -c <this source> <json>` reads code from stdin and reports
on the fd named in the JSON. Tests: `python -m pytest tests/test_sandbox.py`.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import platform
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["ok", "error", "timeout", "memory_exceeded", "output_limit"]
Isolation = Literal["auto", "bwrap", "plain"]

_CODE_NAME = "<code>"  # filename of model code in tracebacks
_SANDBOX_HOME = "/tmp"  # working dir and $HOME inside the bwrap sandbox


@dataclass(frozen=True)
class SandboxLimits:
    """Limits and placement of one execution; every value bounds what model code can take."""

    timeout_s: float = 10.0  # wall clock, default for run()
    cpu_time_s: int = 10  # RLIMIT_CPU per process (SIGXCPU, then SIGKILL 1 s later)
    memory_bytes: int = 512 * 2**20  # RLIMIT_AS per process
    file_size_bytes: int = 16 * 2**20  # RLIMIT_FSIZE: largest file it may write
    max_processes: int = 16  # RLIMIT_NPROC: processes + threads of the sandbox user
    max_open_files: int = 128  # RLIMIT_NOFILE
    max_output_bytes: int = 64 * 2**10  # per stream (stdout, stderr); more -> "output_limit"
    tmpfs_bytes: int = 64 * 2**20  # size of the writable /tmp in bwrap mode
    sandbox_uid: int = 65534  # user the code runs as when we are root (nobody)
    sandbox_gid: int = 65534
    isolation: Isolation = "auto"  # "bwrap" refuses to degrade; "plain" skips bwrap
    python: str | None = None  # interpreter for the code; None = first that the sandbox can run


@dataclass(frozen=True)
class ExecResult:
    """What one execution did. `value` is the rendered trailing expression, None if there was none."""

    status: Status
    stdout: str
    stderr: str
    value: str | None
    error: str | None  # one line, e.g. "ZeroDivisionError: division by zero"
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class SandboxCapabilities:
    """Protections measured by a probe run inside the sandbox (not assumed)."""

    mode: str  # "bwrap" or "plain"
    python: str
    uid: int  # uid the code runs as, as the host sees it
    active: tuple[str, ...]
    missing: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        text = (f"sandbox mode={self.mode} uid={self.uid} python={self.python}; "
                f"active: {', '.join(self.active)}")
        if self.missing:
            text += f"; MISSING: {', '.join(self.missing)}"
        return text


def render_value(value: Any) -> str:
    """REPL-style repr, except floats: integral -> int text, others -> 10 significant digits."""
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return format(value, ".10g")
    if isinstance(value, list):
        return "[" + ", ".join(render_value(v) for v in value) + "]"
    if isinstance(value, tuple):
        inner = ", ".join(render_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{render_value(k)}: {render_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def format_tool_output(result: ExecResult, max_chars: int = 1000) -> str:
    """The text placed between <|output_start|> and <|output_end|>: prints, then value or error."""
    head = result.stdout.rstrip("\n") if result.stdout.strip() else ""
    if result.status == "ok":
        tail = result.value or ""
    elif result.status == "output_limit":
        tail = "[output truncated]"
    else:
        tail = result.error or result.status
    cut = "[... truncated]"
    budget = max_chars - len(tail) - (1 if tail else 0)  # room for the printed text and a newline
    if len(head) > budget:
        head = head[: max(budget - len(cut), 0)] + cut
    return "\n".join(p for p in (head, tail) if p)[:max_chars]


def sandbox_capabilities(config: SandboxLimits | None = None) -> SandboxCapabilities:
    """Probe this machine and report which protections a Sandbox(config) gets."""
    return Sandbox(config).capabilities


class Sandbox:
    """Runs code in a fresh sandboxed interpreter per call; thread-safe (no shared mutable state)."""

    def __init__(self, config: SandboxLimits | None = None) -> None:
        self.config = config or SandboxLimits()
        self._source = Path(__file__).read_text()  # the child program is this file
        self._as_root = os.geteuid() == 0
        self.capabilities = self._pick_mode_and_probe()
        log = logging.getLogger(__name__)
        (log.warning if self.capabilities.missing else log.info)(self.capabilities.summary())

    def run(self, code: str, timeout_s: float | None = None) -> ExecResult:
        """Execute `code`; the result holds prints, the trailing expression's value and a status."""
        if not isinstance(code, str):
            raise TypeError(f"code must be str, got {type(code).__name__}")
        timeout = self.config.timeout_s if timeout_s is None else timeout_s
        if timeout <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout}")
        return self._run(code, timeout, self.capabilities.mode, self.capabilities.python)

    # ---- parent side ----------------------------------------------------------------------------

    def _pick_mode_and_probe(self) -> SandboxCapabilities:
        cfg = self.config
        modes = {"auto": ["bwrap", "plain"], "bwrap": ["bwrap"], "plain": ["plain"]}[cfg.isolation]
        failures: dict[str, list[str]] = {"bwrap": [], "plain": []}
        if shutil.which("bwrap") is None and "bwrap" in modes:
            failures["bwrap"].append("bwrap not installed (run scripts/install_sandbox_deps.sh)")
            modes.remove("bwrap")
        candidates = [cfg.python] if cfg.python else [os.path.realpath(sys.executable), "/usr/bin/python3"]
        for mode in modes:
            for python in dict.fromkeys(candidates):
                caps = self._probe(mode, python, failures[mode])
                if caps is None:
                    continue
                if mode == "plain" and failures["bwrap"]:
                    why = "bwrap unusable: " + " | ".join(failures["bwrap"])
                    caps = SandboxCapabilities(caps.mode, caps.python, caps.uid, caps.active,
                                               caps.missing + (why,))
                return caps
        raise RuntimeError(
            "no working sandbox on this machine: " + " | ".join(failures["bwrap"] + failures["plain"]) +
            ". Install bubblewrap and python3 (scripts/install_sandbox_deps.sh) or set SandboxLimits.python "
            "to an interpreter the sandbox user can execute."
        )

    def _probe(self, mode: str, python: str, failures: list[str]) -> SandboxCapabilities | None:
        host_home = os.path.expanduser("~")
        code = (
            "import os, socket, json\n"
            "try:\n    socket.socket(); net = False\nexcept OSError:\n    net = True\n"
            f"facts = dict(uid=os.getuid(), net_blocked=net, home_hidden=not os.path.exists({host_home!r}),"
            f" parent_hidden=not os.path.exists('/proc/{os.getpid()}/environ'),"
            " seccomp=open('/proc/self/status').read().split('Seccomp:')[1].split()[0] == '2')\n"
            "print(json.dumps(facts))"
        )
        try:
            res = self._run(code, 30.0, mode, python)
            facts = json.loads(res.stdout) if res.ok else None
        except (OSError, ValueError) as exc:
            res, facts = None, None
            failures.append(f"{mode} with {python}: {exc}")
        if facts is None:
            if res is not None:
                failures.append(f"{mode} with {python}: {res.status} {res.error} {res.stderr.strip()[-300:]}")
            return None
        host_uid = self.config.sandbox_uid if self._as_root else os.getuid()
        checks = {
            "namespaces(user,pid,net,ipc,uts,mount)": mode == "bwrap",
            "read-only /usr + private tmpfs /tmp": mode == "bwrap",
            f"unprivileged uid {host_uid}": host_uid != 0,
            "uid separate from the caller's": self._as_root,
            "seccomp(no sockets/ptrace/mount/setsid)": facts["seccomp"],
            "network blocked": facts["net_blocked"],
            "host home hidden": facts["home_hidden"],
            "parent /proc hidden": facts["parent_hidden"],
            "rlimits(as,cpu,fsize,nproc,nofile)": True,
            "scrubbed env": True,
            "tree kill on exit/timeout": True,
        }
        return SandboxCapabilities(
            mode=mode, python=python, uid=host_uid,
            active=tuple(k for k, v in checks.items() if v),
            missing=tuple(k for k, v in checks.items() if not v),
        )

    def _command(self, mode: str, python: str, args_json: str) -> list[str]:
        child = [python, "-I", "-u", "-X", "utf8", "-c", self._source, args_json]
        if mode == "plain":
            return child
        cmd = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
               "--new-session", "--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                cmd += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                cmd += ["--ro-bind", top, top]
        cmd += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        prefix = os.path.dirname(os.path.dirname(python))  # <prefix>/bin/python3
        if prefix not in ("/usr", "/"):
            cmd += ["--ro-bind", prefix, prefix]
        cmd += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
                "--size", str(self.config.tmpfs_bytes), "--tmpfs", _SANDBOX_HOME,
                "--chdir", _SANDBOX_HOME, "--remount-ro", "/", "--"]
        return cmd + child

    def _run(self, code: str, timeout: float, mode: str, python: str) -> ExecResult:
        workdir = None
        if mode == "plain":
            workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
            if self._as_root:
                os.chown(workdir, self.config.sandbox_uid, self.config.sandbox_gid)
        home = workdir or _SANDBOX_HOME
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
        read_fd, write_fd = os.pipe()
        limits = {k: getattr(self.config, k) for k in (
            "cpu_time_s", "memory_bytes", "file_size_bytes", "max_processes", "max_open_files",
            "max_output_bytes")}
        args_json = json.dumps({"result_fd": write_fd, **limits})
        user = dict(user=self.config.sandbox_uid, group=self.config.sandbox_gid, extra_groups=[]) \
            if self._as_root else {}
        start = time.monotonic()
        try:
            try:
                proc = subprocess.Popen(
                    self._command(mode, python, args_json), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, pass_fds=(write_fd,), cwd=workdir or "/", env=env,
                    start_new_session=True, **user,
                )
            finally:
                os.close(write_fd)
            streams, killed = self._collect(proc, code, read_fd, start + timeout)
        finally:
            os.close(read_fd)
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        return self._result(proc.returncode, streams, killed, time.monotonic() - start, timeout)

    def _collect(self, proc: subprocess.Popen, code: str, result_fd: int,
                 deadline: float) -> tuple[dict[str, bytes], str | None]:
        """Feed code, read stdout/stderr/result until EOF; kill the tree on exit, timeout or flood."""
        pending = memoryview(code.encode("utf-8", "surrogatepass"))
        os.set_blocking(proc.stdin.fileno(), False)
        cap = self.config.max_output_bytes
        bufs = {"stdout": bytearray(), "stderr": bytearray(), "result": bytearray()}
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        sel.register(result_fd, selectors.EVENT_READ, "result")
        sel.register(proc.stdin, selectors.EVENT_WRITE, "stdin")
        pidfd = os.pidfd_open(proc.pid)
        sel.register(pidfd, selectors.EVENT_READ, "exit")
        killed, open_streams = None, 3
        try:
            while open_streams:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if killed is not None:
                        break  # the tree is dead but something still holds a pipe: give up
                    killed = "timeout"
                    _kill_tree(proc.pid)
                    deadline = time.monotonic() + 5.0  # drain what the dead tree left in the pipes
                    continue
                for key, _ in sel.select(timeout=remaining):
                    name = key.data
                    if name == "exit":
                        sel.unregister(pidfd)
                        _kill_tree(proc.pid)  # descendants that outlive the child die with it
                        continue
                    if name == "stdin":
                        try:
                            pending = pending[os.write(key.fd, pending[:65536]):]
                        except BrokenPipeError:
                            pending = pending[:0]  # the child died before reading; stderr says why
                        if not pending:
                            sel.unregister(proc.stdin)
                            proc.stdin.close()
                        continue
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        open_streams -= 1
                        continue
                    bufs[name] += chunk
                    if len(bufs[name]) > cap * (4 if name == "result" else 1) and killed is None:
                        killed = "output_limit"
                        _kill_tree(proc.pid)
        finally:
            sel.close()
            os.close(pidfd)
            _kill_tree(proc.pid)
            proc.wait()
            _kill_tree(proc.pid, wait_s=3.0)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                pipe.close()
        return {k: bytes(v) for k, v in bufs.items()}, killed

    def _result(self, returncode: int, streams: dict[str, bytes], killed: str | None,
                duration: float, timeout: float) -> ExecResult:
        cap = self.config.max_output_bytes
        stdout = streams["stdout"][:cap].decode("utf-8", "replace")
        stderr = streams["stderr"][:cap].decode("utf-8", "replace")
        events = [json.loads(line) for line in streams["result"].splitlines() if line.startswith(b"{")]
        started = any(e.get("event") == "started" for e in events)
        finished = next((e for e in events if e.get("event") == "finished"), None)

        def make(status: Status, error: str | None, value: str | None = None) -> ExecResult:
            return ExecResult(status, stdout, stderr, value, error, duration)

        if killed == "timeout":
            return make("timeout", f"TimeoutError: execution exceeded the {timeout:g} s time limit")
        if killed == "output_limit":
            return make("output_limit", f"OutputLimitError: output exceeded {cap} bytes")
        if finished is not None:
            return make(finished["status"], finished["error"], finished["value"])
        if not started:
            raise OSError(f"sandbox failed to start (exit code {returncode}): {stderr.strip()[-500:]}")
        sig = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
        if sig == signal.SIGXCPU:
            return make("timeout", f"TimeoutError: CPU time exceeded {self.config.cpu_time_s} s")
        how = f"signal {signal.Signals(sig).name}" if sig > 0 else f"exit code {returncode}"
        return make("error", f"SystemError: the process ended before the code finished ({how})")


def _kill_tree(pgid: int, wait_s: float = 0.0) -> None:
    """SIGKILL the child's process group (bwrap: its death tears down the whole pid namespace).
    With wait_s, repeat until the group is gone: killed orphans stay in it (and count against the
    sandbox uid's RLIMIT_NPROC) until init reaps them, and the next call should start clean."""
    end = time.monotonic() + wait_s
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() >= end:
            if wait_s:
                logging.getLogger(__name__).warning(
                    "sandbox process group %d survives %.0f s after SIGKILL: does init reap zombies?",
                    pgid, wait_s)
            return
        time.sleep(0.02)


# ---- child side: runs inside the sandbox, executes model code ------------------------------------

# name: (x86_64 number, aarch64 number); every call here answers EPERM inside the sandbox
_BLOCKED_SYSCALLS = {
    "socket": (41, 198), "socketpair": (53, 199), "connect": (42, 203), "bind": (49, 200),
    "listen": (50, 201), "accept": (43, 202), "accept4": (288, 242), "ptrace": (101, 117),
    "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "mount": (165, 40),
    "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51), "unshare": (272, 97),
    "setns": (308, 268), "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "setsid": (112, 157), "setpgid": (109, 154), "kexec_load": (246, 104),
    "kexec_file_load": (320, 294), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "reboot": (169, 142), "swapon": (167, 224), "swapoff": (168, 225),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264), "open_tree": (428, 428),
    "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432),
    "fspick": (433, 433), "mount_setattr": (442, 442),
}
_ARCHES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}  # column, AUDIT_ARCH_*
_CLONE, _CLONE3 = (56, 220), (435, 435)
_CLONE_NEW_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET


def _seccomp_program(column: int, audit_arch: int) -> bytes:
    """Classic BPF: wrong arch -> kill; blocked call -> EPERM; clone3 -> ENOSYS (libc falls back
    to clone, whose flags BPF can read); clone with namespace flags -> EPERM; else allow."""
    import struct

    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, ..., RET|K
    allow, kill, errno = 0x7FFF0000, 0x80000000, 0x00050000  # SECCOMP_RET_*
    eperm, enosys = errno | 1, errno | 38
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    if column == 0:
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]  # x32 ABI numbers
    for numbers in _BLOCKED_SYSCALLS.values():
        prog += [(jeq, 0, 1, numbers[column]), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 1, _CLONE3[column]), (ret, 0, 0, enosys)]
    prog += [(jeq, 0, 3, _CLONE[column]), (ld, 0, 0, 16), (jset, 0, 1, _CLONE_NEW_FLAGS),
             (ret, 0, 0, eperm), (ret, 0, 0, allow)]
    return b"".join(struct.pack("HBBI", *ins) for ins in prog)


def _install_seccomp() -> bool:
    """Install the filter on this (single-threaded) process; False where the arch is unknown."""
    import ctypes

    arch = _ARCHES.get(platform.machine())
    if arch is None:
        return False
    program = _seccomp_program(*arch)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    prog = SockFprog(len(program) // 8, program)
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)) != 0:
        return False
    return libc.prctl(pr_set_seccomp, ctypes.c_ulong(seccomp_mode_filter), ctypes.byref(prog),
                      ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0


def _apply_limits(limits: dict[str, int]) -> None:
    cpu = limits["cpu_time_s"]
    for res, value in (
        (resource.RLIMIT_AS, (limits["memory_bytes"],) * 2),
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_FSIZE, (limits["file_size_bytes"],) * 2),
        (resource.RLIMIT_NPROC, (limits["max_processes"],) * 2),
        (resource.RLIMIT_NOFILE, (limits["max_open_files"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(res, value)


def _execute(code: str, max_value_chars: int) -> dict[str, Any]:
    """Run code as a REPL cell: statements, then the trailing expression's value (if any)."""
    import linecache

    linecache.cache[_CODE_NAME] = (len(code), None, code.splitlines(True), _CODE_NAME)
    scope: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        tree = ast.parse(code, _CODE_NAME)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, _CODE_NAME, "exec"), scope)
        value = None
        if last is not None:
            value = eval(compile(ast.Expression(last.value), _CODE_NAME, "eval"), scope)
        text = None if value is None else render_value(value)[:max_value_chars]
        return {"status": "ok", "value": text, "error": None}
    except BaseException as exc:  # noqa: BLE001 - the model's code may raise anything, SystemExit too
        te = traceback.TracebackException.from_exception(exc)
        te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename == _CODE_NAME])
        sys.stderr.write("".join(te.format()))
        status = "memory_exceeded" if isinstance(exc, MemoryError) else "error"
        error = "".join(te.format_exception_only()).strip().splitlines()[-1]
        return {"status": status, "value": None, "error": error}


def _child_main() -> None:
    args = json.loads(sys.argv[1])
    out = os.fdopen(args["result_fd"], "w")
    code = sys.stdin.buffer.read().decode("utf-8", "surrogatepass")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # stdin: empty from here on
    os.close(devnull)
    _apply_limits(args)
    seccomp = _install_seccomp()
    out.write(json.dumps({"event": "started", "seccomp": seccomp}) + "\n")
    out.flush()
    result = _execute(code, args["max_output_bytes"])
    sys.stdout.flush()
    out.write(json.dumps({"event": "finished", **result}) + "\n")
    out.flush()


if __name__ == "__main__":
    _child_main()
