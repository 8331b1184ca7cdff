"""`gradstats train`: the command line of a training run (trainer.py) that logs gradient
statistics every K steps, with checkpoints, --resume and torchrun (docs/train.md).

    gradstats train --out OUT [--data builtin|PATH] [--model cifar_resnet|resnet18|...] ...
    torchrun --nproc_per_node=N -m gradstats train --out OUT ...
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, fields

from ..extras import MissingExtra, require
from ..models import VARIANTS
from .checkpoint import CheckpointError, load_checkpoint
from .trainer import CHECKPOINT, DTYPES, TORCHVISION_MODELS, TrainConfig, train

# What defines a run: --resume refuses values different from the checkpoint's (other options may
# change, e.g. --log-every, --device).
RUN_FIELDS = (
    "data",
    "model",
    "depth",
    "width",
    "preact",
    "variant",
    "epochs",
    "steps",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "schedule",
    "milestones",
    "gamma",
    "augment",
    "image_size",
    "sync_bn",
    "amp",
    "per_sample",
    "dtype",
    "seed",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    # Every option defaults to None here, so that --resume can tell which were given: the
    # others continue as the checkpoint's run had them (--stop-at excepted).
    add = parser.add_argument
    add("--out", help=f"output folder (default {d.out}; with --resume PATH, PATH's folder)")
    add(
        "--data",
        help="'builtin' (scikit-learn's 1,797 digits, default), a CIFAR-10/100 python-format folder, "
        "or an ImageFolder folder (streamed at --image-size; needs torchvision: pip install gradstats[data])",
    )
    add(
        "--model",
        help=f"cifar_resnet (default) or a torchvision {', '.join(TORCHVISION_MODELS)} "
        "(CIFAR stem for images up to 64x64)",
    )
    add("--depth", type=int, help=f"cifar_resnet depth 6n+2 (default {d.depth})")
    add("--width", type=float, help="cifar_resnet channel multiplier, a positive real (default 1)")
    add("--preact", action="store_true", default=None, help="cifar_resnet: pre-activation blocks")
    add("--variant", help=f"cifar_resnet ablation: {', '.join(VARIANTS)} (default {d.variant})")
    add("--epochs", type=int, help=f"epochs (default {d.epochs})")
    add("--steps", type=int, help="total steps instead of --epochs (the schedule spans them)")
    add("--batch-size", type=int, help=f"global batch, split over the processes (default {d.batch_size})")
    add("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    add("--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    add("--weight-decay", type=float, help=f"(default {d.weight_decay})")
    add("--schedule", choices=["cosine", "step"], help="per-step learning-rate schedule (default cosine)")
    add("--milestones", type=_fractions, help="step schedule: comma list of run fractions (default 0.5,0.75)")
    add("--gamma", type=float, help=f"step schedule: factor at each milestone (default {d.gamma})")
    add(
        "--augment",
        action="store_true",
        default=None,
        help="random crops (4-pixel padding; ImageFolder data: random-resized crops) and horizontal flips",
    )
    add(
        "--image-size",
        type=int,
        metavar="PIXELS",
        help="ImageFolder data: train on PIXELS x PIXELS crops (default 224 for torchvision models, "
        "32 for cifar_resnet; at least 8); digits and CIFAR are 32x32",
    )
    add(
        "--workers",
        type=int,
        help="ImageFolder data: DataLoader processes decoding images (default: 4, at most the CPUs; 0: none)",
    )
    add(
        "--sync-bn",
        action="store_true",
        default=None,
        help="BN statistics over the global batch across processes (GradStatSyncBatchNorm)",
    )
    add(
        "--amp",
        action="store_true",
        default=None,
        help="mixed precision: bfloat16 autocast on CPU; float16 autocast with a GradScaler on CUDA "
        "(statistics in loss units, skipped steps left out: gradstats.track_grad_scaler)",
    )
    add(
        "--per-sample",
        action="store_true",
        default=None,
        help="also record the per-sample terms of the BN parameter gradients: gradient noise scale, "
        "GSNR and the between/within split of dy's variance (docs/noise.md)",
    )
    add("--dtype", choices=list(DTYPES), help="model and data dtype (default float32)")
    add("--seed", type=int, help="(default 0)")
    add(
        "--log-every",
        type=int,
        metavar="K",
        help=f"record gradient statistics every K steps (default {d.log_every})",
    )
    add("--checkpoint-every", type=int, metavar="N", help="checkpoint every N steps (default: each epoch)")
    add(
        "--stop-at",
        type=int,
        metavar="STEP",
        help="stop after this step, with a checkpoint, to --resume later",
    )
    add(
        "--resume",
        nargs="?",
        const="auto",
        metavar="PATH",
        help="continue the run in a checkpoint (default OUT/checkpoint.pt)",
    )
    add("--device", help="auto (default: CUDA if available), cpu, cuda, cuda:N")
    add(
        "--wandb",
        metavar="PROJECT",
        help="also log to this Weights & Biases project (pip install 'gradstats[wandb]'; "
        "WANDB_MODE=offline keeps it local)",
    )
    add(
        "--alert-thresholds",
        type=_thresholds,
        metavar="NAME=VALUE,...",
        help="health-alert thresholds (gradstats.alerts.AlertThresholds: dx_over_dy_expected, "
        "dx_over_dy_band, block_ratio, dead_channels; docs/analysis.md)",
    )
    add("--eval-batch-size", type=int, help=f"(default {d.eval_batch_size})")
    add("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    add(
        "--no-tensorboard",
        dest="tensorboard",
        action="store_const",
        const=False,
        help="no TensorBoard events even if tensorboard is installed",
    )


def _fractions(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated fractions like 0.5,0.75, got {text!r}"
        ) from None


def _thresholds(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        name, sep, value = (p.strip() for p in item.partition("="))
        try:
            number = int(value) if value.isdigit() else float(value)
        except ValueError:
            number = None
        if not sep or not name or number is None:
            raise argparse.ArgumentTypeError(
                f"expected NAME=VALUE pairs like block_ratio=4,dead_channels=1, got {item!r}"
            )
        values[name] = number
    return values


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict | None]:
    """The run's configuration and, with --resume, the checkpoint it continues."""
    if args.steps is not None and args.steps < 1:  # 0 inside TrainConfig means "use --epochs"
        raise ValueError(f"--steps must be at least 1 (leave it out to train --epochs), got {args.steps}")
    given = {
        f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None
    }
    resume = None
    if args.resume is not None:
        out = given.get("out") or (
            TrainConfig.out if args.resume == "auto" else os.path.dirname(args.resume) or "."
        )
        path = os.path.join(out, CHECKPOINT) if args.resume == "auto" else args.resume
        try:
            resume = load_checkpoint(path)
        except CheckpointError as error:
            raise ValueError(f"--resume: {error}") from error
        if resume.get("format") != "gradstats-train":
            raise ValueError(f"--resume: {path} is a gradstats checkpoint but not of `gradstats train`")
        saved = {**asdict(TrainConfig()), **resume["config"]}  # fields newer than the checkpoint: defaults
        conflicts = [k for k in RUN_FIELDS if k in given and given[k] != saved[k]]
        if conflicts:
            raise ValueError(
                "--resume: the checkpoint's run has "
                + ", ".join(
                    f"--{k.replace('_', '-')} {saved[k]} (this command: {given[k]})" for k in conflicts
                )
                + "; leave them out to continue the run as it was"
            )
        known = {f.name for f in fields(TrainConfig)}
        given = {**{k: v for k, v in saved.items() if k in known}, "stop_at": 0, **given, "out": out}
    config = TrainConfig(**given)
    config.validate()
    if config.wandb:
        try:
            require("wandb", "--wandb")
        except MissingExtra as error:
            raise ValueError(str(error)) from error
    if resume is None and os.path.exists(os.path.join(config.out, CHECKPOINT)):
        raise ValueError(
            f"--out {config.out} already holds a run ({CHECKPOINT}); continue it with --resume, "
            f"or choose another --out"
        )
    return config, resume


def main(args: argparse.Namespace) -> int:
    config, resume = config_from_args(args)
    train(config, resume)
    return 0
