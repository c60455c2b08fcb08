"""Export to and import from transformers' NanoChat format (nanochat/hf_format.py, jobs/export.py).

The model here is a tiny GQA GPT (2 layers, 4 query / 2 key-value heads) trained for a few dozen
AdamW steps in-process on text made by the test, with a 512-token tokenizer trained on the same
text: CPU, float32, SDPA. transformers is the reference on the other side; it is imported here,
never by the code under test.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint as ckpt
from nanochat import hf_format
from nanochat.engine import Engine, SamplingParams
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer, TokenizerFormatError
from tests.helpers import tiny_gpt

transformers = pytest.importorskip("transformers")

REPO_ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the cat sat on a mat while python code ran fast and slow numbers add up to ten "
         "print def return if else for in range list dict open file read write yes no hello world").split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one torch thread (on a shared 2-core machine two threads mostly wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + rng.choice([".", "?", "!", "\n"])


def _corpus() -> list[str]:
    """Enough varied text for a 512-token BPE, offline: a few standard-library modules' source."""
    import inspect
    import json as json_module
    import textwrap

    return [line for mod in (random, textwrap, json_module.decoder) for line in inspect.getsource(mod).splitlines()]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator(_corpus(), 512)


def _build(tok: Tokenizer, seed: int = 0, **changes) -> GPT:
    cfg = GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return tiny_gpt(cfg, seed)


@pytest.fixture(scope="module")
def trained(tokenizer) -> GPT:
    """A few dozen AdamW steps on the test text, so logits and greedy paths are not degenerate."""
    model = _build(tokenizer)
    rng = random.Random(1)
    ids = []
    for _ in range(200):
        ids += tokenizer.encode(_text(rng, 20), prepend="<|bos|>")
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        starts = torch.randint(0, len(data) - 65, (8,), generator=gen)
        x = torch.stack([data[s : s + 64] for s in starts])
        y = torch.stack([data[s + 1 : s + 65] for s in starts])
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def exported(trained, tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "model"
    hf_format.save_hf(out, trained, tokenizer, chat=True, meta={"stage": "sft", "run": "t"})
    return out


@pytest.fixture(scope="module")
def hf_model(exported):
    return transformers.AutoModelForCausalLM.from_pretrained(exported, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    return transformers.AutoTokenizer.from_pretrained(exported)


# -- model ------------------------------------------------------------------------------------------


def test_exported_config_is_nanochat_with_float32_epsilon(exported, tokenizer):
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["model_type"] == "nanochat" and cfg["architectures"] == ["NanoChatForCausalLM"]
    assert cfg["rms_norm_eps"] == torch.finfo(torch.float32).eps
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (4, 2, 256)
    assert cfg["bos_token_id"] == tokenizer.get_bos_token_id()
    assert cfg["eos_token_id"] == tokenizer.encode_special("<|assistant_end|>")
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()]


@pytest.mark.parametrize("length", [1, 17, 300])
def test_transformers_logits_equal_ours(trained, hf_model, length):
    trained.set_cpu_prepack(False)
    x = torch.randint(0, trained.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ours, theirs = trained(x), hf_model(x).logits
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() <= 1e-6


def test_greedy_generation_of_64_tokens_is_identical(trained, hf_model, tokenizer):
    engine = Engine(trained, max_batch_size=4, max_seq_len=128)
    prompts = [tokenizer.encode(t, prepend="<|bos|>") for t in ("the cat sat", "print def", "hello world and")]
    ours = engine.generate(prompts, SamplingParams(max_new_tokens=64, temperature=0.0))
    engine.close()
    trained.set_cpu_prepack(False)
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=64, eos_token_id=None,
                                           pad_token_id=tokenizer.get_bos_token_id())
    for prompt, gen in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), generation_config=config)
        theirs = out[0, len(prompt):].tolist()
        assert len(gen.tokens) == 64
        assert theirs == gen.tokens


def _hf_built(tokenizer: Tokenizer, directory: Path, seed: int = 0):
    """A NanoChat model made by transformers itself (its own init, its default rms_norm_eps 1e-6),
    saved with save_pretrained, plus our tokenizer.json beside it."""
    config = transformers.NanoChatConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tokenizer.get_bos_token_id(), eos_token_id=tokenizer.encode_special("<|assistant_end|>"),
        pad_token_id=tokenizer.get_bos_token_id())
    torch.manual_seed(seed)
    model = transformers.NanoChatForCausalLM(config).eval()
    model.save_pretrained(directory)
    tokenizer.export_hf(directory / "tokenizer.json")
    return model


def test_directory_saved_by_transformers_imports_with_the_same_logits(tokenizer, tmp_path):
    theirs = _hf_built(tokenizer, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rms_norm_eps"] == 1e-6
    ours, meta = ckpt.load_model(tmp_path, "cpu")  # the path every stage takes
    assert ours.config.norm_eps == 1e-6 and ours.config.n_kv_head == 2
    assert meta["tokenizer_dir"] == str(tmp_path)
    x = torch.randint(0, tokenizer.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max().item() <= 1e-6
    # the same weights through the training stages' loader
    weights = ckpt.load_weights(tmp_path, "cpu")
    assert all(torch.equal(weights[k], v) for k, v in ours.state_dict().items())


def test_export_import_export_is_byte_identical(trained, tokenizer, tmp_path):
    hf_format.save_hf(tmp_path / "a", trained, tokenizer, chat=True)
    again, _ = ckpt.load_model(tmp_path / "a", "cpu")
    hf_format.save_hf(tmp_path / "b", again, tokenizer, chat=True)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_sharded_export_has_an_index_and_loads_in_both(trained, tokenizer, tmp_path):
    files = hf_format.save_hf(tmp_path, trained, tokenizer, chat=True, max_shard_bytes=60_000)
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    ours, _ = ckpt.load_model(tmp_path, "cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, tokenizer.vocab_size, (1, 9))
    trained.set_cpu_prepack(False)
    with torch.no_grad():
        assert torch.equal(ours(x), trained(x))
        assert (theirs(x).logits - trained(x)).abs().max().item() <= 1e-6
    hf_format.save_hf(tmp_path, trained, tokenizer, chat=True)  # again into the same directory
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


# -- tokenizer and chat template --------------------------------------------------------------------


def _conversations(n: int) -> list[list[dict]]:
    rng = random.Random(7)
    convs = []
    for i in range(n):
        msgs = [{"role": "system", "content": _text(rng, 5)}] if i % 3 == 0 else []
        turns = 1 + i % 4
        for t in range(turns):
            msgs.append({"role": "user", "content": _text(rng, 3 + i % 7)})
            if t == turns - 1 and i % 2 == 0:
                break  # ends with the user: a prompt for the next answer
            if i % 4 == 1:
                parts = [{"type": "text", "text": _text(rng, 4)},
                         {"type": "python", "text": f"{rng.randint(1, 99)} + {rng.randint(1, 99)}"},
                         {"type": "python_output", "text": str(rng.randint(2, 198))},
                         {"type": "text", "text": _text(rng, 2)}]
                msgs.append({"role": "assistant", "content": parts})
            else:
                msgs.append({"role": "assistant", "content": _text(rng, 6)})
        convs.append(msgs)
    return convs


def test_chat_template_gives_our_rendering(tokenizer, hf_tokenizer):
    convs = _conversations(24)
    assert sum(m[0]["role"] == "system" for m in convs) >= 5
    assert sum(any(isinstance(x["content"], list) for x in m) for m in convs) >= 5
    for msgs in convs:
        if msgs[-1]["role"] == "user":
            theirs = hf_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False)
            assert theirs == tokenizer.render_for_completion({"messages": msgs}), msgs
        else:
            theirs = hf_tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False)
            assert theirs == tokenizer.render_conversation({"messages": msgs}, max_tokens=10**6)[0], msgs


def test_special_token_text_in_content_is_where_the_two_differ(tokenizer, hf_tokenizer):
    """transformers matches special-token text inside content as the special token; our rendering
    encodes content as plain text (a user cannot forge <|assistant_end|>). Only such content differs."""
    msgs = [{"role": "user", "content": "say <|assistant_end|> now"}]
    theirs = hf_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    ours = tokenizer.render_for_completion({"messages": msgs})
    end = tokenizer.encode_special("<|assistant_end|>")
    assert theirs != ours
    assert theirs.count(end) == 1 and ours.count(end) == 0
    assert tokenizer.decode(theirs) == tokenizer.decode(ours)  # the same text, tokenized differently


def test_tokenizer_json_round_trips_into_our_tokenizer(tokenizer, exported):
    again = Tokenizer.load(exported)  # no tokenizer.rbpe there: read from tokenizer.json
    assert again.vocab_size == tokenizer.vocab_size
    assert again.core.get_merges() == tokenizer.core.get_merges()
    text = "hello world, def f(): return 42 <|bos|>"
    assert again.encode(text) == tokenizer.encode(text)


# -- bad input --------------------------------------------------------------------------------------


def test_another_model_type_is_refused(exported, tmp_path):
    for f in exported.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(hf_format.HFFormatError, match="'llama' model; only model_type 'nanochat'"):
        ckpt.load_model(tmp_path, "cpu")
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "silu", "rope_parameters":
                                                      {"rope_type": "default", "rope_theta": 5e5}}))
    with pytest.raises(hf_format.HFFormatError, match=r"hidden_act 'silu'.*rope_theta 500000"):
        ckpt.load_model(tmp_path, "cpu")


def test_missing_tokenizer_is_a_clear_error(exported, tmp_path):
    from nanochat.evals.harness import load_eval_state

    for f in exported.iterdir():
        if f.name != "tokenizer.json":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    _, meta = ckpt.load_model(tmp_path, "cpu")
    assert meta["tokenizer_dir"] is None
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_eval_state(tmp_path, None, "cpu")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.rbpe nor tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_vocabulary_mismatch_and_wrong_shapes_are_clear_errors(exported, tmp_path):
    for f in exported.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    Tokenizer.train_from_iterator(_corpus(), 400).export_hf(tmp_path / "tokenizer.json")
    with pytest.raises(hf_format.HFFormatError,
                       match="the tokenizer has 400 tokens but config.json's vocab_size is 512"):
        ckpt.load_model(tmp_path, "cpu")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 400}))
    with pytest.raises(hf_format.HFFormatError, match=r"embed_tokens.weight is \(512, 64\) but the config needs"):
        ckpt.load_model(tmp_path, "cpu")


def test_a_tokenizer_not_in_nanochat_layout_is_refused(tokenizer):
    data = tokenizer.hf_json()
    data["added_tokens"] = data["added_tokens"][:-1]
    with pytest.raises(TokenizerFormatError, match="special tokens"):
        Tokenizer.from_hf_json(data)
    data = tokenizer.hf_json()
    data["model"]["merges"] = list(reversed(data["model"]["merges"]))
    with pytest.raises(TokenizerFormatError, match="rank order"):
        Tokenizer.from_hf_json(data)


def test_a_tokenizer_converted_from_tiktoken_by_transformers_imports(tokenizer, tmp_path):
    """nanochat's published checkpoints carry a tokenizer.json made by transformers' TikTokenConverter
    from the tiktoken ranks: every split of a token whose halves are tokens is listed as a merge."""
    import base64

    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = tokenizer.core.get_mergeable_ranks()
    (tmp_path / "tok.tiktoken").write_text("".join(f"{base64.b64encode(b).decode()} {r}\n" for b, r in ranks))
    from nanochat.tokenizer import SPECIAL_TOKENS

    converted = TikTokenConverter(vocab_file=str(tmp_path / "tok.tiktoken"), pattern=tokenizer.core.get_pattern(),
                                  extra_special_tokens=list(SPECIAL_TOKENS)).converted()
    converted.save(str(tmp_path / "tokenizer.json"))
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert len(data["model"]["merges"]) > len(ranks) - 256  # several splits listed for some tokens
    again = Tokenizer.load(tmp_path)
    assert again.core.get_merges() == tokenizer.core.get_merges()
    text = "\n".join(_corpus()[:200])
    assert again.encode(text) == tokenizer.encode(text)


# -- the job, the stages' inputs, the report --------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(trained, tokenizer, tmp_path_factory):
    """A run with a tokenizer stage and an SFT stage, written as the stages write them."""
    from cluster.storage import RunStorage

    storage = RunStorage("hfrun", str(tmp_path_factory.mktemp("runs")))
    with storage.writer("tokenizer", {}) as w:
        tokenizer.save(w.path)
        w.commit()
    with storage.writer("sft", {}) as w:
        ckpt.save_model(w.path / "model", trained, {"step": 40})
        w.commit()
    return storage


def test_export_job_writes_a_directory_transformers_loads_offline(sft_run, tmp_path, trained):
    from jobs import export

    out = tmp_path / "out"
    assert export.main(["--run", "hfrun", "--storage", sft_run.uri, "--stage", "sft", "--out", str(out)]) == 0
    assert (out / "README.md").read_text().count("nanochat d2 (sft, run `hfrun`)") == 1
    code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True); "
            "t = AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True); "
            "ids = t.apply_chat_template([{'role': 'user', 'content': 'hello'}], add_generation_prompt=True, "
            "return_tensors='pt', return_dict=True); "
            "print(type(m).__name__, m.generate(**ids, max_new_tokens=3).shape)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "NanoChatForCausalLM" in res.stdout
    assert export.main(["--run", "hfrun", "--storage", sft_run.uri, "--stage", "rl", "--out",
                        str(tmp_path / "x")]) == 2


def test_export_and_import_run_without_transformers(exported, tmp_path):
    code = ("import sys; from nanochat import checkpoint, hf_format; from nanochat.tokenizer import Tokenizer; "
            "import jobs.export; m, meta = checkpoint.load_model(sys.argv[1], 'cpu'); "
            "hf_format.save_hf(sys.argv[2], m, Tokenizer.load(meta['tokenizer_dir']), chat=True); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code, str(exported), str(tmp_path / "again")], capture_output=True,
                         text=True, timeout=300, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()


def test_chat_rl_and_evaluation_stages_start_from_a_transformers_directory(exported, sft_run):
    from cluster.artifacts import find_model, read_model_config
    from jobs import evaluate
    from jobs.config import load_stage_config
    from jobs.rl import RLConfig, model_inputs
    from jobs.sft import SftConfig

    saved = read_model_config(str(exported))["model_config"]
    assert saved["n_kv_head"] == 2 and saved["norm_eps"] is None and saved["sequence_len"] == 128
    settings = load_stage_config(SftConfig, "sft", "micro", [f"init_from={exported}"]).to_spec()
    ref = find_model(sft_run, settings.previous, settings.init_from)
    assert (ref.model, ref.tokenizer) == (str(exported), str(exported))
    assert model_inputs(sft_run, RLConfig(model_dir=str(exported))) == (str(exported), str(exported))
    cfg = evaluate.EvaluateConfig(model_dir=str(exported))  # the run has no midtrain stage: not needed
    assert evaluate.stage_inputs(sft_run, "midtrain", cfg) == (str(exported), None, {})


def test_serving_loads_a_transformers_directory(exported, tokenizer):
    from serve_app.config import ModelSpec, ServeConfig
    from serve_app.models import ServedModel

    spec = ModelSpec(name="hf-import", model_uri=str(exported), kind="chat", tool_use=False)
    served = ServedModel.load(spec, ServeConfig(models=[spec], device="cpu"))
    try:
        assert served.tokenizer.vocab_size == tokenizer.vocab_size
        assert served.stop_ids == (tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id())
        assert served.engine.model.config.n_kv_head == 2
    finally:
        served.close()


def test_a_gqa_import_cannot_be_trained_and_says_why(exported, tokenizer):
    from cluster.artifacts import read_model_config
    from cluster.chat_train import chat_train_spec
    from cluster.train import make_plan
    from jobs.config import load_stage_config
    from jobs.sft import SftConfig

    saved = read_model_config(str(exported))["model_config"]
    settings = load_stage_config(SftConfig, "sft", "micro", ["rows_per_step=8", "device_batch_size=4"]).to_spec()
    with pytest.raises(ValueError, match="not the depth-derived shape"):  # width 64 is not 64 x 2 layers
        chat_train_spec(settings, saved, 2)
    saved = {**saved, "n_layer": 1}  # width 64 = 64 x 1 layer: the shape fits, the key/value heads do not
    plan = make_plan(chat_train_spec(settings, saved, 2), tokenizer.vocab_size, 1)
    with pytest.raises(ckpt.CheckpointError, match="n_kv_head: saved 2, now 4"):
        ckpt.check_model_config(saved, plan.model, "at the import")


@pytest.mark.cluster
@pytest.mark.slow  # ~1.5 min on 2 shared cores; the pieces it joins have unit tests above
def test_sft_and_evaluation_start_from_a_directory_saved_by_transformers(ray_cluster, embedded_pack, tokenizer,
                                                                         tmp_path, capsys):
    """transformers' own model (rms_norm_eps 1e-6, micro's depth-2 shape) as SFT's init_from; the
    stage keeps the epsilon; the evaluation reads the transformers directory directly."""
    from jobs import evaluate, sft

    hf_dir = tmp_path / "hf"
    config = transformers.NanoChatConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.get_bos_token_id(), pad_token_id=tokenizer.get_bos_token_id())
    torch.manual_seed(0)
    transformers.NanoChatForCausalLM(config).save_pretrained(hf_dir)
    tokenizer.export_hf(hf_dir / "tokenizer.json")
    base = ["--preset", "micro", "--run", "imp", "--storage", str(tmp_path / "runs")]
    assert sft.main([*base, "--set", f"init_from={hf_dir}", "--set", "num_iterations=2",
                     "--set", "eval_every=-1", "--set", "val_conversations=8"]) == 0, capsys.readouterr().err
    model_dir = tmp_path / "runs" / "imp" / "sft" / "model"
    saved = json.loads((model_dir / "config.json").read_text())["model_config"]
    assert saved["norm_eps"] == 1e-6 and saved["n_layer"] == 2
    assert sorted(p.name for p in (model_dir / "tokenizer").iterdir()) == ["tokenizer.json"]  # not the weights
    assert evaluate.main(["--stage", "sft", *base, "--set", f"model_dir={hf_dir}", "--set", "num_actors=1",
                          "--set", "chat_max_per_task=1", "--set", "format_items=0"]) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "runs" / "imp" / "evaluate" / "sft.json").read_text())
    assert result["model"] == str(hf_dir) and result["eval_bpb"] > 0


def test_report_has_the_inference_section(sft_run):
    from jobs import report

    argv = ["--run", "hfrun", "--storage", sft_run.uri, "--set", "inference_prompt_tokens=16",
            "--set", "inference_new_tokens=4"]
    assert report.main(argv) == 0
    text = (Path(sft_run.stage_path("report")) / "report.md").read_text()
    section = text.split("## Inference", 1)[1].split("\n## ", 1)[0]
    for b in (1, 8, 32):
        assert f"\n| {b} | " in section
    figures = sft_run.read_meta("report")["metrics"]["inference"]
    assert figures["stage"] == "sft" and figures["new_tokens"] == 4
    assert all(m["tokens_per_s"] > 0 and m["ttft_ms"] > 0 for m in figures["batches"].values())
    assert figures["peak_memory_mib"] > 0


# -- a stock server ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_transformers_serve_answers_a_chat_completion(exported, tmp_path):
    cli = Path(sys.executable).with_name("transformers")
    if not cli.exists():
        pytest.skip(f"no transformers CLI next to {sys.executable}")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(cli), "serve", str(exported), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline, ready = time.time() + 180, False
        while time.time() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                ready = True
                break
            except OSError:
                time.sleep(1)
        if not ready:
            tail = (tmp_path / "serve.log").read_text()[-1500:]
            if proc.poll() is not None and ("uvicorn" in tail.lower() or "fastapi" in tail.lower()):
                pytest.skip(f"transformers serve cannot start here (serving extras missing): {tail}")
            pytest.fail(f"transformers serve did not become ready: {tail}")
        body = json.dumps({"model": str(exported), "max_tokens": 8,
                           "messages": [{"role": "user", "content": "hello world"}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(answer["choices"][0]["message"]["content"], str)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
