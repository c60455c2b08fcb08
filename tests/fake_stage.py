"""A minimal stage used by the pipeline tests: `python -m tests.fake_stage --name a ...`.

Writes `{run}/<name>/out.txt` through the real StageWriter. If the file named by
$FAKE_STAGE_CRASH_FILE exists and contains this stage's name, it exits half-way (after writing
part of its output) to simulate a crash.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cluster.storage import RunStorage
from jobs.config import stage_argparser


def main() -> int:
    p = stage_argparser("fake_stage", "test stage")
    p.add_argument("--name", required=True)
    args = p.parse_args()
    storage = RunStorage(args.run, args.storage)
    crash = os.environ.get("FAKE_STAGE_CRASH_FILE")
    with storage.writer(args.name, {"name": args.name, "preset": args.preset}) as w:
        (w.path / "out.txt").write_text(f"{args.name} of {args.run}\n")
        if crash and Path(crash).is_file() and Path(crash).read_text().strip() == args.name:
            print(f"{args.name}: simulated crash", flush=True)
            os._exit(3)
        w.metrics["ok"] = 1
        w.commit()
    print(f"{args.name}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
