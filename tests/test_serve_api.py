"""The deployed chat service driven by real clients: the official `openai` package (max_retries=0),
raw HTTP for malformed input, and headless Chromium for the web page.

One Serve application for the whole module (a random 2-layer GPT, vocab 512, on the session's
local Ray cluster): chat and text completions, streaming and not, n > 1, stop strings, usage,
log-probs, errors (unknown model, bad key, malformed bodies, limits, overload), continuous
batching shown by timing and by the scheduler's step log, client disconnects, metrics, the page.

Run: PYTHONPATH=. python -m pytest tests/test_serve_api.py -q  (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
import time
from pathlib import Path

import openai
import pytest
import requests

from cluster.local import free_port
from serve_app.config import ServeConfig
from serve_app.testing import write_random_checkpoint
from tests.helpers import hi, wait_for

pytestmark = pytest.mark.cluster

KEY = "test-key-123"
CHAT, BASE = "nanochat-sft", "nanochat-base"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    """Base URL of the deployed app (API key KEY, models CHAT and BASE on the same random weights)."""
    from ray import serve

    from serve_app.app import deploy

    ckpt = write_random_checkpoint(tmp_path_factory.mktemp("serve") / "model", vocab_size=512, sequence_len=512)
    config = ServeConfig(
        models=[{"name": CHAT, "model_uri": str(ckpt), "tool_use": False},
                {"name": BASE, "model_uri": str(ckpt), "kind": "base"}],
        port=free_port(), api_keys=[KEY], num_cpus=1, torch_threads=1, max_batch_size=8, max_waiting=2,
        limits={"max_messages": 64, "max_chars": 20_000, "max_body_bytes": 1_000_000},
    )
    url = deploy(config)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    for model in (CHAT, BASE):  # load both models before timing anything
        client.completions.create(model=model, prompt="warm", max_tokens=2)
    try:
        yield url
    finally:
        serve.shutdown()


@pytest.fixture
def client(service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service}/v1", api_key=KEY, max_retries=0, timeout=60)


# ---- the OpenAI API ----------------------------------------------------------------------------


def test_chat_non_streaming_and_streaming_agree(client) -> None:
    whole = client.chat.completions.create(model=CHAT, messages=hi(), max_tokens=24, seed=7, temperature=0.9)
    choice = whole.choices[0]
    assert whole.id.startswith("chatcmpl-") and whole.model == CHAT and whole.object == "chat.completion"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens <= 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = client.chat.completions.create(model=CHAT, messages=hi(), max_tokens=24, seed=7, temperature=0.9,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == choice.message.content  # same seed: same tokens, streamed or not
    assert finish == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_second_turn_reports_its_reused_prefix(client) -> None:
    messages = hi("tell me about the prefix cache, " * 12)
    first = client.chat.completions.create(model=CHAT, messages=messages, max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens % 16 == 0  # whole blocks of 16 tokens
    messages += [{"role": "assistant", "content": first.choices[0].message.content}, *hi("and then?")]
    second = client.chat.completions.create(model=CHAT, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    usage = list(second)[-1].usage
    # the first turn's prompt was stored when its prefill ended: at least its whole blocks come back
    assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // 16 * 16 > 0
    assert usage.prompt_tokens > first.usage.prompt_tokens


def test_completions_with_several_prompts_and_n(client) -> None:
    out = client.completions.create(model=BASE, prompt=["Once upon", "The cat"], max_tokens=6, n=2, seed=3,
                                    extra_body={"ignore_eos": True, "top_k": 20})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 4 * 6
    assert len({c.text for c in out.choices}) > 1  # n samples differ


def test_chat_n_choices_stream(client) -> None:
    stream = client.chat.completions.create(model=CHAT, messages=hi(), max_tokens=8, n=3, stream=True,
                                            extra_body={"ignore_eos": True})
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in stream if c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length", 2: "length"}


def test_stop_string_spanning_tokens(client) -> None:
    kw = dict(model=BASE, prompt="Mi ka lo", max_tokens=40, seed=11, logprobs=1, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0]
    tokens, text = full.logprobs.tokens, full.text
    # a stop string made of the end of one token and the start of the next, first seen there
    for i in range(4, len(tokens) - 1):
        a, b = tokens[i], tokens[i + 1]
        stop = a[-2:] + b[:1]
        at = full.logprobs.text_offset[i] + len(a) - 2
        if len(a) >= 2 and b and "\ufffd" not in a + b and text.find(stop) == at:
            break
    else:
        pytest.skip("the random model produced no two clean adjacent tokens")
    cut = client.completions.create(**{**kw, "stop": [stop]}).choices[0]
    assert cut.text == text[:at] and cut.finish_reason == "stop"
    streamed = client.completions.create(**{**kw, "stop": stop, "stream": True})
    pieces = [c.choices[0].text for c in streamed]
    assert "".join(pieces) == text[:at] and stop not in "".join(pieces)


def test_logprobs_and_seeded_determinism(client) -> None:
    a = client.chat.completions.create(model=CHAT, messages=hi(), max_tokens=10, seed=5, logprobs=True,
                                       extra_body={"ignore_eos": True})
    b = client.chat.completions.create(model=CHAT, messages=hi(), max_tokens=10, seed=5)
    entries = a.choices[0].logprobs.content
    assert a.choices[0].message.content == b.choices[0].message.content
    assert 0 < len(entries) <= 10 and all(e.logprob <= 0 for e in entries)
    assert "".join(e.token for e in entries).replace("\ufffd", "") in a.choices[0].message.content.replace("\ufffd", "")


def test_models_health_and_page(service, client) -> None:
    assert {m.id for m in client.models.list().data} == {CHAT, BASE}
    assert requests.get(f"{service}/health", timeout=30).json()["status"] == "ok"
    page = requests.get(f"{service}/", timeout=30)
    assert page.status_code == 200 and "<title>nanochat</title>" in page.text


def test_unknown_model_and_wrong_route(client) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=hi(), max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=hi(), max_tokens=2)
    assert "completions" in e.value.message


def test_bad_or_missing_key(service) -> None:
    wrong = openai.OpenAI(base_url=f"{service}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=CHAT, messages=hi(), max_tokens=2)
    r = requests.get(f"{service}/v1/models", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


AUTH = {"Authorization": f"Bearer {KEY}"}


def post(service: str, body: bytes | dict, path: str = "/v1/chat/completions") -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{service}{path}", data=data, timeout=60,
                         headers={**AUTH, "Content-Type": "application/json"})


def step_log(service: str, last: int) -> list[dict]:
    r = requests.get(f"{service}/debug/steps", params={"model": CHAT, "last": last}, headers=AUTH, timeout=30)
    return r.json()["steps"]


@pytest.mark.parametrize("body, status", [
    (b'{"model": "nanochat-sft", "messages": [', 400),  # malformed JSON
    ({"model": CHAT, "messages": "hello"}, 400),  # wrong type
    ({"model": CHAT, "messages": hi(), "temperature": "hot"}, 400),
    ({"model": CHAT, "messages": hi(), "max_tokens": -5}, 400),
    ({"model": CHAT, "messages": hi("a") * 10_000}, 400),  # 10k messages (under the byte limit)
    ({"model": CHAT, "messages": hi("x" * 2_000_000)}, 413),  # body over max_body_bytes
    ('{"model": "nanochat-sft", "messages": [{"role": "user", "content": "\xff\xfe"}]}'.encode("latin-1"), 400),
    ({"model": CHAT, "messages": hi("y" * 30_000)}, 400),  # over max_chars
    ({"model": CHAT, "messages": hi("word " * 900)}, 400),  # longer than the context
    ({"model": CHAT, "messages": hi(), "max_tokens": 100_000}, 400),
    ({"model": CHAT, "messages": [{"role": "assistant", "content": "hi"}]}, 400),
    ({"model": CHAT, "messages": hi(), "n": 99}, 400),
])
def test_malformed_and_oversized_requests(service, body, status) -> None:
    if isinstance(body, dict) and len(body["messages"]) == 10_000:  # a valid alternating conversation
        body["messages"] = [m if i % 2 == 0 else {"role": "assistant", "content": "b"}
                            for i, m in enumerate(body["messages"])]
    r = post(service, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    assert post(service, {"model": CHAT, "messages": hi(), "max_tokens": 2}).status_code == 200  # still up


# ---- batching, backpressure, cancellation ------------------------------------------------------


def stream_timed(service: str, max_tokens: int, prompt: str) -> dict:
    """Stream a chat request; times (s since start) of the first and last token, and the request id."""
    t0 = time.monotonic()
    body = {"model": CHAT, "messages": hi(prompt), "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    first = rid = None
    chunks = 0
    with requests.post(f"{service}/v1/chat/completions", json=body, timeout=120, headers=AUTH, stream=True) as r:
        for line in r.iter_lines(decode_unicode=True):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            rid = chunk["id"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") is not None:
                chunks += 1
                first = first or time.monotonic() - t0
    return {"id": rid, "ttft": first, "end": time.monotonic() - t0, "start": t0, "chunks": chunks}


def test_continuous_batching_short_request_overtakes_long_one(service) -> None:
    with cf.ThreadPoolExecutor(2) as pool:
        long_f = pool.submit(stream_timed, service, 480, "tell me a long story")
        time.sleep(0.5)  # the long request is decoding by now
        short = stream_timed(service, 8, "short")
        long = long_f.result()
    assert long["start"] + long["end"] > short["start"] + short["end"]  # the short one finished first
    assert short["ttft"] < long["end"]
    steps = step_log(service, 5000)
    both = [s for s in steps if s["kind"] == "decode" and {f"{long['id']}/0", f"{short['id']}/0"} <= set(s["rows"])]
    assert len(both) >= 5, "the short request's tokens were not decoded in the long request's steps"


def test_overload_answers_429_and_recovers(service) -> None:
    # 8 engine slots + 2 waiting places: a burst of 14 long requests must see some 429s
    body = {"model": CHAT, "messages": hi(), "max_tokens": 300, "ignore_eos": True}
    with cf.ThreadPoolExecutor(14) as pool:
        statuses = list(pool.map(lambda _: post(service, body).status_code, range(14)))
    assert statuses.count(200) >= 10 and 429 in statuses and set(statuses) <= {200, 429}
    assert post(service, {"model": CHAT, "messages": hi(), "max_tokens": 2}).status_code == 200


def test_client_disconnect_frees_the_slot(service) -> None:
    body = {"model": CHAT, "messages": hi(), "max_tokens": 480, "stream": True, "ignore_eos": True}
    with requests.post(f"{service}/v1/chat/completions", json=body, timeout=60, headers=AUTH, stream=True) as r:
        lines = r.iter_lines(decode_unicode=True)
        rid = json.loads(next(line for line in lines if line.startswith("data: "))[6:])["id"]
        for _ in range(5):
            next(lines)
    def decoded_without_it() -> bool:  # disconnect -> handler cancelled -> slot freed before a later step
        post(service, {"model": CHAT, "messages": hi(), "max_tokens": 4})  # a step after the cancel
        last = step_log(service, 1)
        return bool(last and last[-1]["rows"] and f"{rid}/0" not in last[-1]["rows"])

    wait_for(decoded_without_it, 30, "a step without the abandoned request", interval=0.5)
    steps = step_log(service, 3000)
    mine = [s for s in steps if f"{rid}/0" in s["rows"]]
    assert mine and len(mine) < 200, f"{len(mine)} steps decoded the abandoned request"
    assert steps[-1]["rows"] and f"{rid}/0" not in steps[-1]["rows"]


# ---- metrics and the web page ------------------------------------------------------------------


def _counted_statuses(text: str) -> set[str]:
    return {line.split('status="')[1].split('"')[0] for line in text.splitlines()
            if line.startswith("ray_nanochat_serve_requests_total") and 'status="' in line}


def test_metrics_reach_prometheus(ray_cluster, service, client) -> None:
    # one answer of each status, sent here: the replicas that answered earlier tests may be gone
    client.chat.completions.create(model=CHAT, messages=hi(), max_tokens=4)
    assert post(service, {"model": CHAT, "messages": []}).status_code == 400
    assert requests.get(f"{service}/v1/models", timeout=30).status_code == 401
    assert post(service, {"model": "gpt-9", "messages": hi()}).status_code == 404
    wanted = ["ray_nanochat_serve_requests_total", "ray_nanochat_serve_ttft_seconds_bucket",
              "ray_nanochat_serve_inter_token_seconds_bucket", "ray_nanochat_serve_tokens_per_second",
              "ray_nanochat_serve_batch_size", "ray_nanochat_serve_queue_depth"]
    statuses = {"200", "400", "401", "404"}
    deadline, missing, counted = time.time() + 60, wanted, set()
    while (missing or not statuses <= counted) and time.time() < deadline:
        text = requests.get(f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics", timeout=10).text
        missing, counted = [w for w in wanted if w not in text], _counted_statuses(text)
        time.sleep(2)
    assert not missing, f"not exported: {missing}"
    assert statuses <= counted, f"statuses counted: {sorted(counted)}"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through chromedriver (Debian packages; scripts/install_browser_deps.sh)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium/chromedriver missing: run scripts/install_browser_deps.sh")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


LAST_REPLY = ("const r = document.querySelectorAll('.msg.assistant'); const m = r[r.length - 1];"
              "return m ? [m.dataset.state, m.querySelector('.content').textContent] : null;")


def test_web_page_streams_a_reply_in_chromium(service, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    driver.get(f"{service}/")
    wait = WebDriverWait(driver, 60, poll_frequency=0.02)
    wait.until(lambda d: "API key" in d.find_element(By.ID, "status").text)  # 401 without a key
    driver.find_element(By.ID, "apikey").send_keys(KEY + "\t")  # change event: saved, models reload
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    driver.execute_script("document.getElementById('max_tokens').value = 120;")
    driver.find_element(By.ID, "input").send_keys("Hello, who are you?")
    driver.find_element(By.ID, "send").click()
    seen = set()  # lengths of the reply while it streams (the page re-renders: read it in one script)

    def streamed(d):
        last = d.execute_script(LAST_REPLY)
        if last:
            seen.add(len(last[1]))
        return last is not None and last[0] == "done"

    wait.until(streamed)
    state, text = driver.execute_script(LAST_REPLY)
    assert text.strip() and "error" not in driver.find_element(By.ID, "status").get_attribute("class")
    assert len(seen - {0}) >= 2, f"the reply appeared at once, not streamed (lengths seen: {sorted(seen)})"
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "serve_web_chat.png"))
    assert (ARTIFACTS / "serve_web_chat.png").stat().st_size > 1000


# The random model never calls the tool on purpose: this stream is scripted in the page's fetch.
SCRIPTED_FETCH = """
window.__bodies = [];
const realFetch = window.fetch;
window.fetch = (url, opts) => {
  if (!String(url).endsWith("chat/completions")) return realFetch(url, opts);
  window.__bodies.push(JSON.parse(opts.body));
  const deltas = [{content: "Let me compute."}, {nanochat_part: {type: "python", text: "6*7"}},
                  {nanochat_part: {type: "python_output", text: "42"}}, {content: " It is 42."}];
  const lines = deltas.map((d) => "data: " + JSON.stringify({choices: [{index: 0, delta: d}]}) + "\\n\\n");
  lines.push("data: [DONE]\\n\\n");
  const enc = new TextEncoder();
  const body = new ReadableStream({start(c) { lines.forEach((l) => c.enqueue(enc.encode(l))); c.close(); }});
  return Promise.resolve(new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}}));
};
"""


def test_web_page_tool_calls_regenerate_and_edit(service, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    wait = WebDriverWait(driver, 30, poll_frequency=0.02)
    driver.get(f"{service}/")  # the key is in localStorage since the previous test
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    driver.execute_script(SCRIPTED_FETCH)
    driver.find_element(By.ID, "input").send_keys("What is 6*7?\n")
    wait.until(lambda d: (d.execute_script(LAST_REPLY) or [""])[0] == "done")
    assert driver.find_element(By.CSS_SELECTOR, ".msg.assistant .part-python").text == "6*7"
    assert driver.find_element(By.CSS_SELECTOR, ".msg.assistant .part-python_output").text == "42"
    assert "It is 42." in driver.execute_script(LAST_REPLY)[1]

    driver.find_element(By.XPATH, "//button[text()='Regenerate']").click()
    wait.until(lambda d: d.execute_script("return window.__bodies.length") == 2)
    wait.until(lambda d: (d.execute_script(LAST_REPLY) or [""])[0] == "done")
    regen = driver.execute_script("return window.__bodies[1]")
    assert [m["role"] for m in regen["messages"]] == ["user"] and regen["stream"] is True
    assert isinstance(regen["temperature"], float | int) and isinstance(regen["top_k"], int)

    driver.find_element(By.ID, "input").send_keys("And 2+2?\n")  # the tool parts go back as parts
    wait.until(lambda d: d.execute_script("return window.__bodies.length") == 3)
    history = driver.execute_script("return window.__bodies[2]")["messages"]
    assert [p["type"] for p in history[1]["content"]] == ["text", "python", "python_output", "text"]
    wait.until(lambda d: (d.execute_script(LAST_REPLY) or [""])[0] == "done")

    driver.find_elements(By.XPATH, "//button[text()='Edit']")[0].click()
    area = driver.find_element(By.CSS_SELECTOR, ".msg.user textarea")
    area.clear()
    area.send_keys("What is 5*5?")
    driver.find_element(By.XPATH, "//button[text()='Save & submit']").click()
    wait.until(lambda d: d.execute_script("return window.__bodies.length") == 4)
    edited = driver.execute_script("return window.__bodies[3]")["messages"]
    assert edited == [{"role": "user", "content": "What is 5*5?"}]  # later turns dropped
    driver.find_element(By.ID, "new").click()
    assert driver.find_elements(By.CSS_SELECTOR, ".msg") == []
