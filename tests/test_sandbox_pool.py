"""Tests for unforgeable HumanEval scoring (nanochat/evals/humaneval_check.py) and the Ray sandbox pool
(cluster/sandbox_pool.py).

Run: PYTHONPATH=. python -m pytest tests/test_sandbox_pool.py -q   (add -m slow for all 164 problems)
The HumanEval tests need no cluster: each forgery is first shown to fool the usual one-process
harness (so the threat is real), then shown to fail under the judge/worker check. The cluster
tests use the session's local Ray cluster (tests/conftest.py).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat.evals.harness import eval_data_dir
from nanochat.evals.humaneval_check import PASS_PREFIX, _from_wire, _to_wire, build_check, check_completion
from nanochat.sandbox import Sandbox, SandboxLimits

pytestmark = pytest.mark.timeout(120)

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap missing")

PROMPT = 'def add(a, b):\n    """Sum of a and b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
GOOD = "    return a + b\n"
WRONG = "    return a - b\n"

FORGERIES = {
    # write the sandbox's own "finished ok" record to every fd that takes it, then leave
    "fake_result_record": (
        "    return 0\n"
        "import json, os, sys\n"
        "try:\n    fds = [json.loads(sys.argv[1])['result_fd']]\n"
        "except Exception:\n    fds = range(3, 64)\n"
        "for fd in fds:\n"
        "    try:\n"
        "        os.write(fd, b'{\"event\": \"finished\", \"status\": \"ok\", \"value\": null, \"error\": null}\\n')\n"
        "    except OSError:\n"
        "        pass\n"
        f"print('{PASS_PREFIX} 0')\n"
        "os._exit(0)\n"
    ),
    # an answer that equals everything
    "always_equal": "    class Yes:\n        def __eq__(self, other):\n            return True\n    return Yes()\n",
    # patch what the harness reports with: every "finished" record says ok
    "patch_reporter": (
        "    return 0\n"
        "import json\n"
        "_dumps = json.dumps\n"
        "def _ok(record, *a, **k):\n"
        "    if record.get('event') == 'finished':\n"
        "        record = dict(record, status='ok', error=None)\n"
        "    return _dumps(record, *a, **k)\n"
        "json.dumps = _ok\n"
    ),
}

SNOOP = (
    "    return a + b\n"
    "import os, sys\n"
    "ppid, leaked = os.getppid(), []\n"
    "for name in ('environ', 'maps', 'mem', 'fd/1', 'fd'):\n"
    "    try:\n"
    "        leaked.append(open(f'/proc/{ppid}/{name}', 'rb').read(1 << 16))\n"
    "    except OSError:\n"
    "        pass\n"
    "try:\n"
    "    open(f'/proc/{ppid}/fd/1', 'w').write('stolen\\n')\n"
    "    leaked.append(b'write')\n"
    "except OSError:\n"
    "    pass\n"
    "sys.stderr.write(f'LEAKED {len(leaked)}\\n')\n"
)


def naive_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The usual HumanEval harness: everything in one process, a clean exit is a pass."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


@pytest.fixture(scope="module")
def scoring_sandbox() -> Sandbox:
    return Sandbox(SandboxLimits(timeout_s=20.0, cpu_time_s=10))


def _humaneval_rows() -> list[dict]:
    path = eval_data_dir() / "humaneval" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} missing: build the evaluation pack with `python -m jobs.data --source embedded`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- the wire format between the judge and the solution's process ------------------------------

plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary()
    | st.complex_numbers(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=4)
    | st.frozensets(st.integers() | st.text(max_size=4), max_size=4),
    max_leaves=20,
)


def _same(a: object, b: object) -> bool:
    """Equal with the same types all the way down (1 == 1.0 == True would hide a lost type)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


@settings(max_examples=300, deadline=None)
@given(plain)
def test_wire_roundtrip_keeps_values_and_types(value: object) -> None:
    assert _same(_from_wire(json.loads(json.dumps(_to_wire(value)))), value)


def test_wire_specials_and_refusals() -> None:
    for v in (math.inf, -math.inf, {1, 2}, -0.0, b"\x00\xff", 10**40):
        assert _same(_from_wire(json.loads(json.dumps(_to_wire(v)))), v)
    assert math.isnan(_from_wire(json.loads(json.dumps(_to_wire(math.nan)))))
    for bad in ({"tuple": "x"}, {"dict": [[1]]}, {"a": [], "b": []}, {"eval": ["1"]}, {"bytes": 3}):
        with pytest.raises(ValueError):
            _from_wire(bad)
    with pytest.raises(TypeError, match="cannot be passed"):
        _to_wire(object())
    with pytest.raises(TypeError, match="cannot be passed"):
        _to_wire(x for x in range(3))


def test_build_check_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="identifier"):
        build_check(PROMPT, GOOD, TEST, "add; import os")
    with pytest.raises(TypeError, match="completion must be str"):
        build_check(PROMPT, None, TEST, "add")  # type: ignore[arg-type]
    (program, line_a), (_, line_b) = build_check(PROMPT, GOOD, TEST, "add"), build_check(PROMPT, GOOD, TEST, "add")
    assert line_a in program and line_b not in program and line_a.startswith(PASS_PREFIX)  # a fresh nonce per check


# ---- scoring in the real sandbox ---------------------------------------------------------------


@needs_bwrap
def test_correct_solution_passes_and_wrong_fails(scoring_sandbox: Sandbox) -> None:
    good = check_completion(scoring_sandbox.run, PROMPT, GOOD, TEST, "add")
    assert good.passed, good.result
    assert good.reason == "passed"
    wrong = check_completion(scoring_sandbox.run, PROMPT, WRONG, TEST, "add")
    assert not wrong.passed and wrong.reason == "AssertionError"
    full_function = check_completion(scoring_sandbox.run, PROMPT, "def add(a, b):\n    return b + a\n", TEST,
                                     "add")
    assert full_function.passed  # a completion may redefine the whole function


@needs_bwrap
@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_results_fool_the_naive_harness_but_not_the_judge(scoring_sandbox: Sandbox, name: str) -> None:
    completion = FORGERIES[name]
    forged = naive_program(PROMPT, completion, TEST, "add")
    assert scoring_sandbox.run(forged).ok, "the forgery no longer works"
    verdict = check_completion(scoring_sandbox.run, PROMPT, completion, TEST, "add")
    assert not verdict.passed, verdict.result


@needs_bwrap
def test_solution_cannot_reach_the_judge(scoring_sandbox: Sandbox) -> None:
    verdict = check_completion(scoring_sandbox.run, PROMPT, SNOOP, TEST, "add")
    assert verdict.passed  # the answer is right; what it tried on the side got nothing
    assert "LEAKED 0" in verdict.result.stderr
    assert "stolen" not in verdict.result.stdout


@needs_bwrap
@pytest.mark.parametrize("completion, reason", [
    ("    return a + b\nraise SystemExit(0)\n", "SystemExit"),
    ("    return a + b\nimport os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", "SIGKILL"),
    ("    while True:\n        pass\n", "TimeoutError"),
    ("    import sys\n    sys.exit(0)\n", "SystemExit"),
])
def test_exits_kills_and_hangs_fail(completion: str, reason: str) -> None:
    quick = Sandbox(SandboxLimits(timeout_s=3.0, cpu_time_s=3))
    verdict = check_completion(quick.run, PROMPT, completion, TEST, "add")
    assert not verdict.passed
    assert reason in verdict.reason


@needs_bwrap
def test_canonical_solutions_of_tricky_problems_pass(scoring_sandbox: Sandbox) -> None:
    """Problems whose tests call prompt helpers (32, 38, 50), the entry point by name (33), use
    `is True` (72) or floats (2, 4); each canonical solution passes and an empty body fails."""
    rows = {r["id"]: r for r in _humaneval_rows()}
    for n in (2, 4, 32, 33, 38, 50, 72):
        row = rows[f"HumanEval/{n}"]
        args = (row["prompt"], row["canonical_solution"], row["test"], row["entry_point"])
        assert check_completion(scoring_sandbox.run, *args).passed, n
        nothing = check_completion(scoring_sandbox.run, row["prompt"], "    return None\n", *args[2:])
        assert not nothing.passed, n


@needs_bwrap
@pytest.mark.slow
def test_all_canonical_solutions_pass(scoring_sandbox: Sandbox) -> None:
    rows = _humaneval_rows()
    run = functools.partial(scoring_sandbox.run, timeout_s=30.0)
    with ThreadPoolExecutor(2) as pool:
        verdicts = list(pool.map(
            lambda r: check_completion(run, r["prompt"], r["canonical_solution"], r["test"], r["entry_point"]), rows))
    failed = {r["id"]: v.reason for r, v in zip(rows, verdicts, strict=True) if not v.passed}
    assert not failed


# ---- the Ray pool --------------------------------------------------------------------------------

OVERLAP = "import time\nstart = time.monotonic()\ntime.sleep(3)\nprint(start, time.monotonic())"


@pytest.fixture(scope="module")
def pool(ray_cluster):
    from cluster.sandbox_pool import SandboxPool

    with SandboxPool(num_actors=2, num_cpus=0.25, max_concurrency=3,
                     limits=SandboxLimits(timeout_s=5.0, cpu_time_s=5)) as p:
        yield p


@pytest.mark.cluster
@needs_bwrap
def test_pool_runs_many_executions_at_once_across_actors(pool) -> None:
    before = {d["pid"]: d["executions"] for d in pool.ready()}
    assert len(before) == 2 and all(d["mode"] == "bwrap" for d in pool.ready())
    results = pool.map([OVERLAP] * 6 + [f"{i} * 7" for i in range(6)], timeout_s=30.0)
    assert [r.value for r in results[6:]] == [str(i * 7) for i in range(6)]
    spans = [tuple(float(x) for x in r.stdout.split()) for r in results[:6]]
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # all six sleeps overlapped
    served = {d["pid"]: d["executions"] - before[d["pid"]] for d in pool.ready()}
    assert sum(served.values()) == 12 and min(served.values()) > 0


@pytest.mark.cluster
@needs_bwrap
def test_hostile_code_does_not_affect_the_others(pool) -> None:
    pids = sorted(d["pid"] for d in pool.ready())
    hostile = [
        "import os\nwhile True:\n    os.fork()",                            # fork bomb
        "while True:\n    pass",                                           # timeout
        "x = bytearray(4 * 2**30)",                                        # 4 GB
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)",
        "print('x' * 10**7)",                                              # output flood
    ]
    honest = [f"print('row {i}')\nsum(range({i}))" for i in range(8)]
    codes = [c for pair in itertools.zip_longest(hostile, honest) for c in pair if c is not None]
    by_code = dict(zip(codes, pool.map(codes), strict=True))
    for i, code in enumerate(honest):
        r = by_code[code]
        assert (r.status, r.stdout, r.value) == ("ok", f"row {i}\n", str(sum(range(i))))
    statuses = [by_code[c].status for c in hostile]
    assert "ok" not in statuses[:3] and statuses[4] == "output_limit"
    assert sorted(d["pid"] for d in pool.ready()) == pids  # no actor died
    assert pool.run("6 * 7").value == "42"


@pytest.mark.cluster
@needs_bwrap
def test_tool_callable_for_the_engine(pool) -> None:
    tool = pool.tool()
    with ThreadPoolExecutor(4) as threads:  # the engine calls it from its tool threads
        outputs = list(threads.map(tool, [f"print('n={i}')\n{i}/2" for i in range(8)]))
    assert outputs == [f"n={i}\n{i / 2:g}" for i in range(8)]
    assert tool("1/0") == "ZeroDivisionError: division by zero"


@pytest.mark.cluster
@needs_bwrap
def test_pool_scores_humaneval_without_forgery(pool) -> None:
    problems = [dict(prompt=PROMPT, completion=c, test=TEST, entry_point="add")
                for c in [GOOD, WRONG, *FORGERIES.values(), SNOOP]]
    verdicts = pool.check_humaneval(problems)
    assert [v.passed for v in verdicts] == [True, False] + [False] * len(FORGERIES) + [True]
    with pytest.raises(ValueError, match="lacks"):
        pool.check_humaneval([dict(prompt=PROMPT, test=TEST, entry_point="add")])


@pytest.mark.cluster
def test_pool_is_picklable_and_reports_closed(ray_cluster) -> None:
    import pickle

    from cluster.sandbox_pool import SandboxPool, SandboxPoolError

    p = SandboxPool(num_actors=1, num_cpus=0.1, max_concurrency=2, limits=SandboxLimits(timeout_s=5.0))
    copy = pickle.loads(pickle.dumps(p))
    assert copy.run("2 ** 10").value == "1024"
    p.close()
    with pytest.raises(SandboxPoolError, match="closed"):
        p.map(["1"])
    with pytest.raises(SandboxPoolError, match="sandbox actor failed"):
        copy.run("1")  # its actor was killed with the original pool
