"""HumanEval scoring that the model's own code cannot forge.

The usual harness runs `prompt + completion + test + check(entry_point)` as one program and calls
a clean exit a pass. Model code in that process controls everything after it: it can write a fake
"finished ok" record to the sandbox's result fd and `os._exit(0)`, patch builtins the test uses,
or return an object whose `__eq__` always says True. Here the verdict is taken where the model's
code never runs, and a pass has to carry a secret the model's code never sees:

- judge (the program `Sandbox.run` executes; our code only): makes itself non-dumpable, so its
  memory and /proc entries are closed to the worker (same uid, no Yama assumed; ptrace and
  process_vm_readv are already refused by the sandbox's seccomp), starts the worker as a fresh
  interpreter (fork + exec: no copy of the judge's memory), runs the problem's prompt and test
  itself and calls `check(candidate)`, where `candidate` sends each call's arguments to the
  worker and decodes the reply as plain data. The assertions compare that data in the judge.
  Only after `check` returns does it print the pass line `humaneval-pass <nonce>` on stdout.
- worker: runs prompt + completion (the model's code) and answers calls. It never holds the
  nonce or the test; its stdout is /dev/null and its stderr the judge's (tracebacks for people,
  never read by the scorer), so it has no way to write the judge's stdout.
- scorer (`check_completion`): a fresh 128-bit nonce per check; passed = sandbox status "ok" and
  the pass line on stdout.

What model code can still do: make its check fail (hang, crash, kill the judge) or return the
right answers. What it cannot: print a pass, exit early "successfully", fake the sandbox's result
record, patch what the test runs, or return objects that lie about equality.

Semantics against the usual harness: arguments are copies (an in-place change to an argument is
not seen by the test); return values must be plain data (None, bool, int, float, complex, str,
bytes, list, tuple, dict, set, frozenset), else the call raises TypeError; a builtin exception
keeps its type across (others arrive as RuntimeError); helper functions the test calls (e.g.
`poly`, `encode_cyclic`) are the prompt's, never redefinitions in the completion, and the
entry point's own name means the candidate. All 164
canonical solutions pass (tests/test_sandbox_pool.py runs a sample; the whole set with -m slow).

Tests: `python -m pytest tests/test_sandbox_pool.py -q -k humaneval`.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from nanochat.sandbox import ExecResult

PASS_PREFIX = "humaneval-pass"
MAX_REPLY_BYTES = 8 * 2**20  # one encoded return value; more fails the call


@dataclass(frozen=True)
class CheckResult:
    """Verdict of one completion: `passed` only with the judge's pass line; `result` is the run."""

    passed: bool
    result: ExecResult

    @property
    def reason(self) -> str:
        """'passed', or why not (the judge's error line, or the sandbox status)."""
        if self.passed:
            return "passed"
        return self.result.error or f"{self.result.status} without the judge's pass line"


# ---- shipped into the sandbox: stdlib only, imports inside, no names from this module's scope ----


def _to_wire(value):
    """Plain data -> a JSON tree; tuple, set, frozenset, dict, bytes and complex are tagged."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    for kind in (bool, int, float, str):  # subclasses travel as their base type
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, list):
        return [_to_wire(v) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_to_wire(v) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {"frozenset" if isinstance(value, frozenset) else "set": [_to_wire(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[_to_wire(k), _to_wire(v)] for k, v in value.items()]}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    raise TypeError(f"a {type(value).__name__} cannot be passed between the test and the solution: "
                    "use None, bool, int, float, complex, str, bytes, list, tuple, dict or set")


def _from_wire(tree):
    """A JSON tree from `_to_wire` -> the value; anything else raises ValueError (strict)."""
    if tree is None or type(tree) in (bool, int, float, str):
        return tree
    if type(tree) is list:
        return [_from_wire(v) for v in tree]
    if type(tree) is dict and len(tree) == 1:
        ((tag, body),) = tree.items()
        if type(body) is list:
            if tag == "tuple":
                return tuple(_from_wire(v) for v in body)
            if tag == "set":
                return {_from_wire(v) for v in body}
            if tag == "frozenset":
                return frozenset(_from_wire(v) for v in body)
            if tag == "dict" and all(type(p) is list and len(p) == 2 for p in body):
                return {_from_wire(k): _from_wire(v) for k, v in body}
            if tag == "complex" and len(body) == 2 and all(type(x) in (int, float) for x in body):
                return complex(body[0], body[1])
        if tag == "bytes" and type(body) is str:
            return bytes.fromhex(body)
    raise ValueError("malformed value from the solution's process")


def _raise_reply(reply):
    """Re-raise an exception the worker reported: builtin Exception types keep their type."""
    import builtins

    name, message = str(reply.get("raised")), str(reply.get("message", ""))
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        raise cls(message)
    raise RuntimeError(f"{name}: {message}")


def _worker_main(request_fd, reply_fd):
    """Run prompt + completion, then answer {"args", "kwargs"} calls with {"value"} or {"raised"}."""
    import json
    import os
    import sys
    import traceback

    requests, replies = os.fdopen(request_fd, "rb"), os.fdopen(reply_fd, "wb")

    def send(text):
        replies.write(text.encode("utf-8", "surrogatepass") + b"\n")
        replies.flush()

    def failure(exc):
        traceback.print_exc(file=sys.stderr)
        return json.dumps({"raised": type(exc).__name__, "message": str(exc)[:2000]})

    setup = json.loads(requests.readline())
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(setup["program"], "<completion>", "exec"), scope)
        function = scope[setup["entry_point"]]
        send(json.dumps({"ready": True}))
    except BaseException as exc:  # noqa: BLE001 - the model's code may raise anything
        send(failure(exc))
        return
    for line in requests:
        try:
            call = json.loads(line)
            value = function(*_from_wire(call["args"]), **_from_wire(call["kwargs"]))
            text = json.dumps({"value": _to_wire(value)})
        except BaseException as exc:  # noqa: BLE001
            text = failure(exc)
        send(text)


def _judge_main(job):
    """Start the worker, run the prompt and the test here, print the pass line if check() returns."""
    import ctypes
    import json
    import os
    import subprocess
    import sys

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_dumpable = 4
    if libc.prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed; refusing to judge")
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    worker = subprocess.Popen(
        [sys.executable, "-I", "-X", "utf8", "-c", job["worker_source"], str(request_r), str(reply_w)],
        pass_fds=(request_r, reply_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    os.close(request_r)
    os.close(reply_w)
    requests, replies = os.fdopen(request_w, "wb"), os.fdopen(reply_r, "rb")

    def exchange(message):
        requests.write(json.dumps(message).encode("utf-8", "surrogatepass") + b"\n")
        requests.flush()
        line = replies.readline(job["max_reply_bytes"])
        if not line.endswith(b"\n"):
            raise RuntimeError("the solution's process ended, or its reply exceeded the size limit")
        reply = json.loads(line)
        if type(reply) is not dict:
            raise ValueError("malformed reply from the solution's process")
        if "raised" in reply:
            _raise_reply(reply)
        return reply

    exchange({"program": job["program"], "entry_point": job["entry_point"]})

    def candidate(*args, **kwargs):
        reply = exchange({"args": _to_wire(list(args)), "kwargs": _to_wire(kwargs)})
        if "value" not in reply:
            raise ValueError("malformed reply from the solution's process")
        return _from_wire(reply["value"])

    candidate.__name__ = job["entry_point"]
    scope = {"__name__": "__main__"}
    exec(compile(job["prompt"], "<prompt>", "exec"), scope)
    scope[job["entry_point"]] = candidate  # tests may call the solution by its name too
    exec(compile(job["test"], "<test>", "exec"), scope)
    scope["check"](candidate)
    worker.kill()
    worker.wait()
    sys.stdout.write(job["pass_line"] + "\n")
    sys.stdout.flush()


_SHARED = (_to_wire, _from_wire, _raise_reply)


def _source(*functions: Callable) -> str:
    return "\n\n".join(inspect.getsource(f) for f in functions)


# ---- parent side ---------------------------------------------------------------------------------


def build_check(prompt: str, completion: str, test: str, entry_point: str) -> tuple[str, str]:
    """(program for Sandbox.run, the pass line it prints on success); a fresh nonce each call."""
    for name, text in (("prompt", prompt), ("completion", completion), ("test", test),
                       ("entry_point", entry_point)):
        if not isinstance(text, str):
            raise TypeError(f"{name} must be str, got {type(text).__name__}")
    if not entry_point.isidentifier():
        raise ValueError(f"entry_point must be a Python identifier, got {entry_point!r}")
    pass_line = f"{PASS_PREFIX} {secrets.token_hex(16)}"
    worker = (_source(*_SHARED, _worker_main)
              + "\n\nimport sys\n_worker_main(int(sys.argv[1]), int(sys.argv[2]))\n")
    job = {
        "worker_source": worker, "program": f"{prompt}{completion}\n", "prompt": prompt, "test": test,
        "entry_point": entry_point, "pass_line": pass_line, "max_reply_bytes": MAX_REPLY_BYTES,
    }
    # the job on its own line: a traceback quotes the call line, not the nonce
    return f"{_source(*_SHARED, _judge_main)}\n\nJOB = {job!r}\n_judge_main(JOB)\n", pass_line


def judge_result(result: ExecResult, pass_line: str) -> bool:
    """True only when the judge ran to the end and printed the pass line."""
    return result.status == "ok" and pass_line in result.stdout.splitlines()


def check_completion(run: Callable[[str], ExecResult], prompt: str, completion: str, test: str,
                     entry_point: str) -> CheckResult:
    """Score one HumanEval completion with `run` (e.g. `functools.partial(sandbox.run, timeout_s=10)`
    or a sandbox pool's run): the completion continues or redefines the prompt's function."""
    program, pass_line = build_check(prompt, completion, test, entry_point)
    result = run(program)
    return CheckResult(judge_result(result, pass_line), result)
