"""Stage `midtrain`: teach the base model conversations, multiple choice and tool use, into {run}/midtrain/.

    python -m jobs.midtrain --preset micro --run R [--storage S] [--set num_iterations=50 ...] [--force]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        -- python -m jobs.midtrain --preset tiny --run demo

Starts from the exported base model {run}/pretrain/model/ (or `init_from`) and its tokenizer;
trains on the stage's mixture (nanochat/tasks: SmolTalk, MMLU auxiliary train, GSM8K with tool
calls, identity and spelling on the hub; the pack's non-evaluation sets offline), each conversation
rendered with its loss mask and packed whole into BOS-led rows (nanochat/data/chat_data.py), on the same
Ray Train machinery as pretraining (cluster/chat_train.py, cluster/train.py): checkpoints, retries,
resume on any number of workers. Writes metrics.jsonl, the exported model {run}/midtrain/model/ and
meta.json (last). A complete stage is skipped unless --force (which starts it over).
The seed's settings: 256 rows of 2,048 tokens per step, its pretraining lrs, constant then a linear
decay over the last 20% of the steps, one epoch.
"""

from __future__ import annotations

import sys

from jobs.chat_stage import ChatStageConfig, run_main
from nanochat.errors import entrypoint


class MidtrainConfig(ChatStageConfig):
    """Midtraining: the seed's defaults (256 packed rows per step, full lr, warmdown over the last 20%)."""

    STAGE, PREVIOUS, LAYOUT = "midtrain", "pretrain", "pack"


@entrypoint
def main(argv: list[str] | None = None) -> int:
    return run_main(MidtrainConfig, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
