"""Stage `sft`: supervised fine-tuning of the midtrained model on whole conversations, into {run}/sft/.

    python -m jobs.sft --preset micro --run R [--storage S] [--set num_epochs=2 ...] [--force]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        -- python -m jobs.sft --preset tiny --run demo

Starts from the exported model {run}/midtrain/model/ (or `init_from`) and its tokenizer; trains on
the stage's mixture (nanochat/tasks: ARC-Easy/Challenge train, GSM8K train, 10k SmolTalk, identity
and spelling on the hub; the pack's non-evaluation sets offline), one conversation per row, padded
to the longest of its micro-batch, loss only on what the assistant writes (nanochat/data/chat_data.py),
on the same Ray Train machinery as pretraining (cluster/chat_train.py, cluster/train.py):
checkpoints, retries, resume on any number of workers. Writes metrics.jsonl, the exported model
{run}/sft/model/ and meta.json (last). A complete stage is skipped unless --force.
The seed's settings: 32 conversations per step, its pretraining lrs x 0.02 decaying linearly to 0
over one epoch.
"""

from __future__ import annotations

import sys

from pydantic import Field

from jobs.chat_stage import ChatStageConfig, run_main
from nanochat.errors import entrypoint


class SftConfig(ChatStageConfig):
    """SFT: the seed's defaults (32 conversations per step, lrs x 0.02 decaying linearly to 0)."""

    STAGE, PREVIOUS, LAYOUT = "sft", "midtrain", "pad"

    val_conversations: int = Field(500, ge=0, description="conversations held out of the mixture for "
                                                         "validation loss (the mixture's last ones)")
    device_batch_size: int = Field(4, ge=1, description="conversations per forward/backward on each worker")
    rows_per_step: int = Field(32, ge=1, description="conversations per optimizer step over all workers (a "
                                                     "multiple of device_batch_size x num_workers)")
    init_lr_frac: float = Field(0.02, gt=0, description="multiplier of all three lrs")
    warmdown_ratio: float = Field(1.0, ge=0, le=1,
                                  description="fraction of steps at the end with linear lr decay")
    eval_every: int = Field(100, description="steps between validation evaluations (<= 0: end only)")
    checkpoint_every: int = Field(200, description="steps between checkpoints (<= 0: end only)")


@entrypoint
def main(argv: list[str] | None = None) -> int:
    return run_main(SftConfig, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
