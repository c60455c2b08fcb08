"""`make demo` from nothing, as the README tells a new user: the service answers, nothing is left behind.

The run itself is the session fixture `newcomer_demo` (tests/newcomer.py); these tests read its record.
The same run is the reference run of tests/test_pipeline_e2e.py, so CI pays for one micro pipeline.
"""

from __future__ import annotations

import pytest

from tests.newcomer import describe

pytestmark = pytest.mark.newcomer


def test_make_demo_from_an_empty_home_ends_with_the_service_answering_its_curl(newcomer_demo):
    run = newcomer_demo
    assert run.make_rc == 0, describe(run)
    out = run.output
    assert "[data] embedded pack at" in out and "building it" in out, "the pack must be built, not found cached"
    assert (run.home / ".ray" / "auth_token").is_file(), "the token must be created in the new user's home"
    assert f"Ray head: 127.0.0.1:{run.ports['gcs']}" in out, describe(run)
    assert run.curl_cmd is not None and f"127.0.0.1:{run.ports['serve']}/v1/chat/completions" in run.curl_cmd
    assert run.curl_rc == 0 and run.reply is not None, describe(run)
    assert run.reply.get("object") == "chat.completion", run.reply
    choice = run.reply["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length") and run.reply["usage"]["completion_tokens"] >= 1


def test_stopping_the_demo_leaves_no_process_and_no_open_port(newcomer_demo):
    run = newcomer_demo
    assert run.stop_rc == 0, run.stop_output
    assert run.leftover_processes == [], "\n".join(run.leftover_processes)
    assert run.open_ports == [], f"ports still open after `make cluster-stop`: {run.open_ports}"
