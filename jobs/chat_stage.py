"""The settings and command line shared by the two chat training stages (jobs/midtrain.py, jobs/sft.py).

Each stage subclasses `ChatStageConfig`, naming itself, the stage it starts from and its row layout
(STAGE, PREVIOUS, LAYOUT) and overriding only the defaults that differ (the seed's midtraining packs
256 rows per step at full lr; its SFT takes 32 padded conversations per step at 0.02 x lr); its
`main` calls `run_main`. `to_spec()` is the one conversion to cluster/specs.py's ChatStageSpec.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from cluster.chat_train import run_chat_stage
from cluster.specs import ChatStageSpec
from cluster.storage import RunStorage
from jobs.config import TrainingConfig, load_stage_config, stage_argparser
from nanochat.data.chat_data import Layout


class ChatStageConfig(TrainingConfig):
    """Settings of a chat training stage; the model's shape comes from the model it starts from."""

    init_from: str | None = Field(None, description="exported model to start from; default "
                                                    "{run}/<previous stage>/model")
    source: Literal["auto", "hub", "pack"] = Field(
        "auto", description="the mixture's data: the Hugging Face hub, the embedded pack, or auto (hub when "
                            "reachable); evaluate with the same chat_source so no evaluation item is "
                            "trained on")
    tasks: list[str] | None = Field(None, description="task specs \"name[:split][,key=value]\" replacing the "
                                                      "stage's own mixture (e.g. sciq:validation,stop=500)")
    mixture_seed: int = Field(42, description="seed of the mixture's shuffle")
    val_conversations: int = Field(1000, ge=0, description="conversations held out of the mixture for "
                                                          "validation loss (the mixture's last ones)")
    num_epochs: float = Field(1.0, gt=0, description="passes over the training conversations (when "
                                                     "num_iterations <= 0)")
    rows_per_step: int = Field(256, ge=1, description="rows per optimizer step over all workers (a "
                                                      "multiple of device_batch_size x num_workers)")
    init_lr_frac: float = Field(1.0, gt=0, description="multiplier of all three lrs (embedding_lr, "
                                                       "unembedding_lr, matrix_lr)")
    eval_every: int = Field(150, description="steps between validation evaluations (<= 0: end only)")
    checkpoint_every: int = Field(500, description="steps between checkpoints (<= 0: end only)")

    STAGE: ClassVar[str]  # each stage's class sets its name, the stage it starts from and its row layout
    PREVIOUS: ClassVar[str]
    LAYOUT: ClassVar[Layout]

    def to_spec(self) -> ChatStageSpec:
        return ChatStageSpec(stage=self.STAGE, previous=self.PREVIOUS, layout=self.LAYOUT,
                             init_from=self.init_from,
                             source=self.source, tasks=tuple(self.tasks) if self.tasks is not None else None,
                             mixture_seed=self.mixture_seed, val_conversations=self.val_conversations,
                             num_epochs=self.num_epochs, num_iterations=self.num_iterations,
                             rows_per_step=self.rows_per_step, device_batch_size=self.device_batch_size,
                             init_lr_frac=self.init_lr_frac, lrs=self.learning_rates(),
                             schedule=self.schedule(), group=self.worker_group())


def run_main(config_cls: type[ChatStageConfig], description: str, argv: list[str] | None = None) -> int:
    """The command line of a chat stage: load the config, skip a complete stage, train, print a summary.
    Bad input raises a NanochatError, which the stage's `@entrypoint` main turns into exit code 2."""
    stage = config_cls.STAGE
    args = stage_argparser(stage, description).parse_args(argv)
    cfg = load_stage_config(config_cls, stage, args.preset, args.overrides)
    storage = RunStorage(args.run, args.storage)
    if storage.is_complete(stage) and not args.force:
        print(f"{stage} of run {args.run} is complete ({storage.stage_uri(stage)}); --force to redo it")
        return 0
    meta = run_chat_stage(storage, cfg.to_spec(), config={"preset": args.preset, **cfg.model_dump()},
                          force=args.force)
    m = meta["metrics"]
    bpb = f", val bpb {m['val_bpb']:.4f}" if m.get("val_bpb") is not None else ""
    print(f"{stage} done: step {m['final_step']}{bpb}, model at {meta['model']}")
    return 0
