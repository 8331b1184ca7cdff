"""`gradstats analyze --compare-shapes`: depth against width at (about) equal parameter count, the
second claim of the ICLR 2018 version of arXiv 1812.00342 ("shallower yet wider resnets have
stronger learning performance than deeper yet thinner resnets").

A shape is DEPTHxWIDTH of a BN + identity-skip CIFAR ResNet (depth 6n + 2; width multiplies the
16/32/64 channels of the three stages, rounded to integers). Per shape and seed it reuses the
analysis of `gradstats analyze` (analyze_variant: the per-block gradient variance at
initialisation, optionally K SGD steps and the same measurement after them) and adds a learning
curve: the training loss of every step and, every K/10 steps, the test loss and accuracy. Over
the seeds it reports mean, standard deviation and range. Output: a table, JSON
(``{"config", "shapes": {name: {"params", "blocks", "summary", "train", "seeds"}}}``) and a PNG.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import cifar_resnet
from ..models.cifar_resnet import stage_channels
from .analyze import AnalysisConfig, analyze_variant, config_from_args, publish
from .data import ImageData, load_dataset
from .options import check_min

# Four shapes within 0.4% of ResNet-20's 272,474 parameters (10 classes), from 9 blocks per
# stage to 1: 56x0.56 272,089; 32x0.76 271,431; 20x1 272,474; 8x1.87 271,480.
DEFAULT_SHAPES = "56x0.56,32x0.76,20x1,8x1.87"
DEFAULT_SEEDS = 3
VARIANT = "bn_skip"  # the paper's network: BN and the identity skip
EVAL_POINTS = 10  # test-set evaluations per run (each costs about a forward pass over the test split)
LOSS_POINTS = 50  # points of the smoothed training-loss curve
_SHAPE = re.compile(r"(\d+)[xX]([^,xX]+)")


@dataclass(frozen=True)
class Shape:
    depth: int
    width: float

    @property
    def name(self) -> str:
        return f"{self.depth}x{self.width:g}"

    @property
    def channels(self) -> list[int]:
        return stage_channels(self.width)

    @property
    def blocks(self) -> int:
        return 3 * ((self.depth - 2) // 6)


def parse_shapes(text: str) -> tuple[Shape, ...]:
    """'56x1,32x1.4,20x2' -> shapes; 'default' -> DEFAULT_SHAPES. ValueError naming the token
    for anything else: not DEPTHxWIDTH, depth not 6n + 2, width not a positive number, two
    tokens that build the same network."""
    if text == "default":
        text = DEFAULT_SHAPES
    tokens = [t.strip() for t in text.split(",")]
    if not any(tokens):
        raise ValueError("--compare-shapes: no shapes given; expected DEPTHxWIDTH,... (e.g. 56x1,20x1.8)")
    shapes: dict[tuple[int, tuple[int, ...]], Shape] = {}
    names: dict[tuple[int, tuple[int, ...]], str] = {}
    for token in tokens:
        match = _SHAPE.fullmatch(token)
        if not match:
            raise ValueError(
                f"--compare-shapes: {token!r} is not DEPTHxWIDTH "
                "(an integer depth and a number, e.g. 56x1 or 20x1.8)"
            )
        depth = int(match.group(1))
        try:
            width = float(match.group(2))
        except ValueError:
            raise ValueError(
                f"--compare-shapes: {token!r}: width {match.group(2)!r} is not a number"
            ) from None
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"--compare-shapes: {token!r}: depth {depth} is not 6n + 2 (8, 14, 20, 32, 56, ...)"
            )
        if not (math.isfinite(width) and width > 0):
            raise ValueError(f"--compare-shapes: {token!r}: width must be a positive number, got {width:g}")
        shape = Shape(depth, width)
        try:
            key = (depth, tuple(shape.channels))
        except ValueError as error:
            raise ValueError(f"--compare-shapes: {token!r}: {error}") from None
        if key in shapes:
            raise ValueError(
                f"--compare-shapes: {token!r} builds the same network as {names[key]!r} "
                f"(depth {depth}, channels {'/'.join(map(str, key[1]))})"
            )
        shapes[key], names[key] = shape, token
    return tuple(shapes.values())


def count_parameters(shape: Shape, num_classes: int = 10, preact: bool = False) -> int:
    model = cifar_resnet(shape.depth, width=shape.width, num_classes=num_classes, preact=preact)
    return sum(p.numel() for p in model.parameters())


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), range and the values themselves."""
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, device: str, batch_size: int = 500):
    """(mean cross-entropy, accuracy) of ``model`` in eval mode (running BN statistics)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for lo in range(0, len(labels), batch_size):
        logits = model(images[lo : lo + batch_size].to(device))
        target = labels[lo : lo + batch_size].to(device)
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(1) == target).sum())
    model.train(was_training)
    n = max(len(labels), 1)
    return loss_sum / n, correct / n


class LearningCurve:
    """``on_step`` callback for analyze's training loop: keeps every step's training loss, and
    every ``eval_every`` steps (and at the last) the test loss and accuracy; at the last step also
    the loss over the whole training split."""

    def __init__(self, data: ImageData, config: AnalysisConfig) -> None:
        self.data, self.config = data, config
        self.eval_every = max(1, config.steps // EVAL_POINTS)
        self.train_loss: list[float] = []
        self.eval = {"step": [], "test_loss": [], "test_accuracy": []}
        self.final: dict = {}

    def __call__(self, model: nn.Module, step: int, loss: float) -> None:
        self.train_loss.append(loss)
        last = step == self.config.steps
        if step % self.eval_every == 0 or last:
            test_loss, accuracy = evaluate(
                model, self.data.test_images, self.data.test_labels, self.config.device
            )
            self.eval["step"].append(step)
            self.eval["test_loss"].append(test_loss)
            self.eval["test_accuracy"].append(accuracy)
        if last:
            train_loss, train_accuracy = evaluate(
                model, self.data.train_images, self.data.train_labels, self.config.device
            )
            self.final = {
                "train_loss": train_loss,
                "train_accuracy": train_accuracy,
                "test_loss": self.eval["test_loss"][-1],
                "test_accuracy": self.eval["test_accuracy"][-1],
            }


def _smoothed(losses: list[float], points: int) -> tuple[list[int], list[float]]:
    """Mean training loss over consecutive windows of steps, at each window's last step."""
    window = max(1, len(losses) // points)
    steps, means = [], []
    for end in range(window, len(losses) + 1, window):
        steps.append(end)
        means.append(statistics.fmean(losses[end - window : end]))
    return steps, means


def compare_shape(shape: Shape, config: AnalysisConfig, data: ImageData, seeds: int) -> dict:
    """One shape over ``seeds`` seeds (config.seed, config.seed + 1, ...)."""
    runs = []
    for offset in range(seeds):
        run_config = replace(config, depth=shape.depth, width=shape.width, seed=config.seed + offset)
        curve = LearningCurve(data, run_config)
        result = analyze_variant(VARIANT, run_config, data, on_step=curve if config.steps else None)
        run = {"seed": run_config.seed, "blocks": result["blocks"], "summary": result["summary"]}
        if config.steps:
            run["after_steps_summary"] = result["after_steps"]["summary"]
            run["train_loss"] = curve.train_loss
            run["eval"] = curve.eval
            run["final"] = curve.final
        runs.append(run)
    return _aggregate(shape, config, data, runs)


def _aggregate(shape: Shape, config: AnalysisConfig, data: ImageData, runs: list[dict]) -> dict:
    count = len(runs[0]["blocks"])
    blocks = []
    for i, first in enumerate(runs[0]["blocks"]):
        grad = spread([r["blocks"][i]["grad_var"] for r in runs])
        # Relative to the output-side block, per seed: the growth towards the input, comparable
        # across widths (the absolute level depends on the head's fan-in).
        relative = spread([r["blocks"][i]["grad_var"] / r["blocks"][-1]["grad_var"] for r in runs])
        blocks.append(
            {
                **{
                    k: first[k]
                    for k in ("index", "name", "stage", "stage_start", "transition_to_next", "channels")
                },
                "position": i / (count - 1) if count > 1 else 0.0,
                "grad_var": grad["mean"],
                "grad_var_seeds": grad["values"],
                "grad_var_over_last": relative["mean"],
                "grad_var_over_last_min": relative["min"],
                "grad_var_over_last_max": relative["max"],
                "act_var": statistics.fmean(r["blocks"][i]["act_var"] for r in runs),
            }
        )
    summary = {}
    for key in ("first_over_last", "within_stage_ratio_max", "within_stage_ratio_geomean"):
        values = [r["summary"][key] for r in runs if r["summary"][key] is not None]
        summary[key] = spread(values) if values else None
    out = {
        "depth": shape.depth,
        "width": shape.width,
        "channels": shape.channels,
        "blocks_per_stage": shape.blocks // 3,
        "params": count_parameters(shape, data.num_classes, config.preact),
        "blocks": blocks,
        "summary": summary,
    }
    if config.steps:
        out["train"] = _aggregate_training(runs)
    out["seeds"] = [{k: v for k, v in r.items() if k != "blocks"} for r in runs]
    return out


def _aggregate_training(runs: list[dict]) -> dict:
    curves = [_smoothed(r["train_loss"], LOSS_POINTS) for r in runs]
    steps = curves[0][0]
    eval_steps = runs[0]["eval"]["step"]
    after = {}
    for key in ("first_over_last", "within_stage_ratio_max"):
        values = [r["after_steps_summary"][key] for r in runs if r["after_steps_summary"][key] is not None]
        after[key] = spread(values) if values else None
    return {
        "final": {key: spread([r["final"][key] for r in runs]) for key in runs[0]["final"]},
        "train_loss_curve": {
            "step": steps,
            "window": steps[0],
            **_pointwise([c[1] for c in curves]),
        },
        "test_curve": {
            "step": eval_steps,
            "test_loss": _pointwise([r["eval"]["test_loss"] for r in runs]),
            "test_accuracy": _pointwise([r["eval"]["test_accuracy"] for r in runs]),
        },
        "after_steps_summary": after,
    }


def _pointwise(series: list[list[float]]) -> dict:
    """Mean, std, min and max over seeds at each point of equally long series."""
    columns = [spread(list(point)) for point in zip(*series)]
    return {key: [c[key] for c in columns] for key in ("mean", "std", "min", "max")}


def run(config: AnalysisConfig, shapes: tuple[Shape, ...], seeds: int, log=print) -> dict:
    data = load_dataset(config.data, seed=config.seed)
    log(f"data: {data.describe()}")
    results = {}
    for shape in shapes:
        start = time.perf_counter()
        results[shape.name] = compare_shape(shape, config, data, seeds)
        log(f"  {shape.name}: {time.perf_counter() - start:.1f} s")
    config_out = {k: v for k, v in vars(config).items() if k not in ("depth", "width", "variants")}
    return {
        "config": {
            **config_out,
            "variant": VARIANT,
            "shapes": [s.name for s in shapes],
            "seeds": seeds,
            "data_description": data.describe(),
        },
        "shapes": results,
    }


# -- reporting ------------------------------------------------------------------------------------


def last_window(steps: int) -> int:
    """Steps whose training losses average into the table's batch loss: the last tenth."""
    return max(1, steps // 10)


def _pm(stat: dict | None, fmt: str, scale: float = 1.0) -> str:
    if stat is None:
        return "n/a"
    return f"{stat['mean'] * scale:{fmt}} ± {stat['std'] * scale:{fmt}}"


def format_report(result: dict) -> str:
    config = result["config"]
    form = "pre-activation" if config["preact"] else "post-activation"
    lines = []
    for name, r in result["shapes"].items():
        lines.append(
            f"\n{name}: {form} BN+skip CIFAR ResNet-{r['depth']}, channels "
            f"{'/'.join(map(str, r['channels']))}, {r['params']:,} parameters; at initialisation, "
            f"mean over {config['seeds']} seed(s)"
        )
        lines.append(
            f"  {'block':<12} {'position':>8} {'stage':>5} {'grad var':>11} {'/ last block':>13} "
            f"{'seed range':>17}"
        )
        for b in r["blocks"]:
            mark = "  <- stage transition" if b["transition_to_next"] else ""
            lines.append(
                f"  {b['name']:<12} {b['position']:>8.3f} {b['stage']:>5} {b['grad_var']:>11.3e} "
                f"{b['grad_var_over_last']:>13.3g} "
                f"{b['grad_var_over_last_min']:>8.3g}..{b['grad_var_over_last_max']:<8.3g}{mark}"
            )
    lines.append(
        f"\nshapes compared ({form} BN+skip, {config['data_description']}; mean ± std over "
        f"{config['seeds']} seed(s)); gradient variance at initialisation: first/last block and the "
        "largest within-stage block-to-block ratio"
    )
    header = (
        f"  {'shape':<9} {'depth':>5} {'channels':>10} {'params':>9} {'first/last':>15} {'max in-stage':>14}"
    )
    if config["steps"]:
        window = last_window(config["steps"])
        header += f"  {'batch loss':>15} {'train loss':>15} {'test loss':>15} {'test accuracy':>15}"
        lines.append(
            f"  after {config['steps']} SGD steps (batch {config['batch_size']}, lr {config['lr']}): "
            f"batch loss = mean training loss of the last {window} steps (train mode, as trained); "
            "train/test loss and test accuracy over the whole splits in eval mode (BN running statistics)"
        )
    lines.append(header)
    for name, r in result["shapes"].items():
        s = r["summary"]
        row = (
            f"  {name:<9} {r['depth']:>5} {'/'.join(map(str, r['channels'])):>10} {r['params']:>9,} "
            f"{_pm(s['first_over_last'], '.3g'):>15} {_pm(s['within_stage_ratio_max'], '.2f'):>14}"
        )
        if "train" in r:
            final = r["train"]["final"]
            batch_loss = spread([statistics.fmean(run["train_loss"][-window:]) for run in r["seeds"]])
            row += (
                f"  {_pm(batch_loss, '.3f'):>15} {_pm(final['train_loss'], '.3f'):>15} "
                f"{_pm(final['test_loss'], '.3f'):>15} "
                f"{_pm(final['test_accuracy'], '.1f', 100):>14}%"
            )
        lines.append(row)
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Gradient variance (relative to the output-side block) against normalised block position,
    and with training, the training loss and test accuracy against step: seed means with a band
    over the seeds' range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = result["config"]
    panels = 3 if config["steps"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(max(7.0, 5.2 * panels), 4.8), squeeze=False)
    ax_var = axes[0][0]
    for name, r in result["shapes"].items():
        label = f"{name} ({r['params'] / 1000:.0f}k)"
        pos = [b["position"] for b in r["blocks"]]
        line = ax_var.plot(
            pos, [b["grad_var_over_last"] for b in r["blocks"]], marker="o", ms=3, label=label
        )[0]
        color = line.get_color()
        ax_var.fill_between(
            pos,
            [b["grad_var_over_last_min"] for b in r["blocks"]],
            [b["grad_var_over_last_max"] for b in r["blocks"]],
            color=color,
            alpha=0.2,
        )
        if "train" not in r:
            continue
        ax_loss, ax_acc = axes[0][1], axes[0][2]
        loss = r["train"]["train_loss_curve"]
        ax_loss.plot(loss["step"], loss["mean"], color=color, label=label)
        ax_loss.fill_between(loss["step"], loss["min"], loss["max"], color=color, alpha=0.2)
        test = r["train"]["test_curve"]
        acc = test["test_accuracy"]
        ax_acc.plot(test["step"], [100 * a for a in acc["mean"]], marker="o", ms=3, color=color, label=label)
        ax_acc.fill_between(
            test["step"], [100 * a for a in acc["min"]], [100 * a for a in acc["max"]], color=color, alpha=0.2
        )
    ax_var.set_yscale("log")
    ax_var.set_xlabel("block position (0: input side, 1: output side)")
    ax_var.set_ylabel("gradient variance / output-side block's")
    ax_var.set_title("at initialisation (band: range over seeds)")
    ax_var.legend(fontsize=8)
    if panels == 3:
        ax_loss, ax_acc = axes[0][1], axes[0][2]
        window = next(iter(result["shapes"].values()))["train"]["train_loss_curve"]["window"]
        ax_loss.set_yscale("log")
        ax_loss.set_xlabel("SGD step")
        ax_loss.set_title(f"training loss (mean over {window}-step windows)")
        ax_acc.set_xlabel("SGD step")
        ax_acc.set_title("test accuracy (%, eval mode)")
        ax_acc.legend(fontsize=8)
    for ax in axes[0]:
        ax.grid(True, which="both", alpha=0.3)
    form = "pre-activation" if config["preact"] else "post-activation"
    fig.suptitle(
        f"{form} BN+skip CIFAR ResNets at about equal parameter count; batch {config['batch_size']}, "
        f"{config['seeds']} seed(s)\n{config['data_description']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line (the options live in analyze.add_arguments) -------------------------------------


def options_from_args(args: argparse.Namespace) -> tuple[AnalysisConfig, tuple[Shape, ...], int]:
    if args.compare_shapes is None:
        raise ValueError("--seeds applies only with --compare-shapes")
    if args.seeds is None:
        args.seeds = DEFAULT_SEEDS
    check_min(args, ("seeds",), 1)
    defaults = AnalysisConfig()
    if args.depth != defaults.depth or args.width != defaults.width:
        raise ValueError("--compare-shapes sets depth and width per shape; drop --depth and --width")
    if args.variants != "all":
        raise ValueError(f"--compare-shapes compares {VARIANT} networks; drop --variants")
    shapes = parse_shapes(args.compare_shapes)
    return config_from_args(args), shapes, args.seeds


def main(args: argparse.Namespace) -> int:
    config, shapes, seeds = options_from_args(args)
    return publish(run(config, shapes, seeds), args, format_report, plot)
