"""`gradstats analyze`: the gradient-propagation analysis of "Analysis on Gradient Propagation in
Batch Normalized Residual Networks" (Panigrahi, Chen, Kuo; arXiv 1812.00342) on CIFAR ResNets.

For each variant (BN and skip connection on or off, zero-initialised branches) it builds the
instrumented network, runs forward/backward passes on real data with a per-sample loss
(cross-entropy), and reads per residual block the variance of the gradient on the skip stream
(a GradProbe at each block output) and of the forward activation there, and per BatchNorm layer
the variance of dy and dx. Optionally it repeats that after K SGD steps.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import batchnorms, instrument, probes
from ..extras import require
from ..models import VARIANTS, cifar_resnet_variant
from ..records import layer_summaries, model_noise_scale
from ..sample_stats import FIELDS as SAMPLE_FIELDS
from ..summary import summarize_channels
from .data import ImageData, load_dataset
from .logs import finite
from .options import check_choice, check_min, check_range, resolve_device
from .sampling import BatchSampler

MAIN_VARIANTS = ["bn_skip", "bn", "skip", "plain"]


@dataclass
class AnalysisConfig:
    depth: int = 32
    variants: tuple[str, ...] = tuple(VARIANTS)
    preact: bool = False
    batch_size: int = 128
    batches: int = 2
    width: float = 1.0
    steps: int = 0
    lr: float = 0.05
    data: str = "builtin"
    device: str = "cpu"
    seed: int = 0
    per_sample: bool = False  # also the noise scale, GSNR and dy variance split per block


def parse_variants(text: str) -> tuple[str, ...]:
    """The variants named in a comma list ('all': every one), each once, in the order given;
    config_from_args checks the names."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    return tuple(VARIANTS) if names == ["all"] else tuple(dict.fromkeys(names))


def _stage_of(model: nn.Module) -> dict[int, int]:
    """Block index -> stage number (1-based), from the model's stage containers."""
    stages = {}
    index = 0
    for stage, layer in enumerate((model.layer1, model.layer2, model.layer3), start=1):
        for _ in layer:
            stages[index] = stage
            index += 1
    return stages


def _batches(
    data: ImageData, config: AnalysisConfig, sampler: BatchSampler, steps: Iterator[int], count: int
):
    """The next ``count`` batches of ``sampler``, taking their step numbers from ``steps``."""
    for step in itertools.islice(steps, count):
        index = sampler.indices(step)
        yield (data.train_images[index].to(config.device), data.train_labels[index].to(config.device))


def measure(
    model: nn.Module, data: ImageData, config: AnalysisConfig, sampler: BatchSampler, steps: Iterator[int]
) -> dict:
    """Block and BN-layer statistics over ``config.batches`` forward/backward passes."""
    block_probes = probes(model)
    for _, module in block_probes + batchnorms(model):
        module.reset_grad_stats()
    # Activation (mean, var) per block summed on the device, [blocks, 2] float64, read once after.
    act = torch.zeros(len(block_probes), 2, dtype=torch.float64, device=config.device)
    model.train()
    for images, labels in _batches(data, config, sampler, steps, config.batches):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        for i, (_, probe) in enumerate(block_probes):
            s = summarize_channels(probe.last_activation_stats)
            act[i] += torch.stack([s["mean"], s["var"]]) / config.batches
    model.zero_grad(set_to_none=True)
    act_mean, act_var = zip(*act.tolist()) if block_probes else ((), ())

    stages = _stage_of(model)
    bn_records, block_records = layer_summaries(model)  # the per-layer summary train logs too
    blocks = []
    for i, ((name, probe), record) in enumerate(zip(block_probes, block_records)):
        blocks.append(
            {
                "index": i,
                "name": name.removesuffix(".grad_probe"),
                "stage": stages[i],
                "stage_start": i == 0 or stages[i] != stages[i - 1],
                "channels": record["channels"],
                "grad_var": record["grad_var"],
                "grad_mean": record["grad_mean"],
                "grad_var_min": record["grad_var_min"],
                "grad_var_max": record["grad_var_max"],
                "grad_var_cv": _spread(probe.accumulated_grad_stats.grad_output.var),
                "act_var": act_var[i],
                "act_mean": act_mean[i],
            }
        )
    for i, block in enumerate(blocks):
        nxt = blocks[i + 1]["grad_var"] if i + 1 < len(blocks) else None
        block["ratio_to_next"] = block["grad_var"] / nxt if nxt else None
        block["transition_to_next"] = i + 1 < len(blocks) and blocks[i + 1]["stage_start"]
    bn_layers = [
        {key: record[key] for key in ("name", "channels", "dy_var", "dx_var", "dy_mean", "dx_mean")}
        | {"dx_over_dy": record["dx_over_dy"] if record["dy_var"] > 0 else None}
        | {key: record[key] for key in SAMPLE_FIELDS if key in record}
        for record in bn_records
    ]
    summary = summarize(blocks)
    if config.per_sample:
        for block in blocks:
            block.update(block_noise(block["name"], bn_records))
        summary["noise_scale"] = model_noise_scale(bn_records)
    return {"blocks": blocks, "bn_layers": bn_layers, "summary": summary}


def block_noise(block: str, bn_records: list[dict]) -> dict:
    """The per-sample quantities of a residual block, from its BN layers' records: B_simple of
    their parameters together (tr(Sigma) and |G|^2 added up), and the channel-averaged GSNR and
    between-sample share of dy's variance averaged over the layers."""
    inside = [r for r in bn_records if r["name"].startswith(block + ".") and "trace_sigma" in r]
    if not inside:
        return {}
    mean = lambda key: statistics.fmean(r[key] for r in inside)  # noqa: E731
    return {
        "noise_scale": model_noise_scale(inside),
        "gsnr_weight": mean("gsnr_weight"),
        "gsnr_bias": mean("gsnr_bias"),
        "dy_between_fraction": mean("dy_between_fraction"),
    }


def _spread(var: Tensor) -> float:
    """Coefficient of variation over channels of the per-channel variances (channels without
    finite values left out); 0 for fewer than two."""
    var = var[~var.isnan()]
    return (var.std(correction=0) / var.mean()).item() if var.numel() > 1 else 0.0


def summarize(blocks: list[dict]) -> dict:
    """Ratios the paper's argument is about: growth of gradient variance towards the input,
    within stages (where the pattern should hold) and over the whole network."""
    within = [b["ratio_to_next"] for b in blocks if b["ratio_to_next"] and not b["transition_to_next"]]
    transitions = [b["ratio_to_next"] for b in blocks if b["ratio_to_next"] and b["transition_to_next"]]
    first, last = blocks[0]["grad_var"], blocks[-1]["grad_var"]
    return {
        "first_over_last": first / last if last > 0 else None,
        "within_stage_ratio_max": max(within) if within else None,
        "within_stage_ratio_geomean": statistics.geometric_mean(within)
        if within and min(within) > 0
        else None,
        "transition_ratios": transitions,
        "act_var_last_over_first": blocks[-1]["act_var"] / blocks[0]["act_var"]
        if blocks[0]["act_var"] > 0
        else None,
    }


def _train(
    model: nn.Module,
    data: ImageData,
    config: AnalysisConfig,
    sampler: BatchSampler,
    steps: Iterator[int],
    on_step=None,
) -> float:
    """``config.steps`` SGD steps; ``on_step(model, step, loss)`` after each (steps count from 1)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    loss = float("nan")
    batches = _batches(data, config, sampler, steps, config.steps)
    for step, (images, labels) in enumerate(batches, start=1):
        optimizer.zero_grad(set_to_none=True)
        out = F.cross_entropy(model(images), labels)
        out.backward()
        optimizer.step()
        loss = out.item()
        if on_step is not None:
            on_step(model, step, loss)
    return loss


def analyze_variant(variant: str, config: AnalysisConfig, data: ImageData, on_step=None) -> dict:
    torch.manual_seed(config.seed)
    model = cifar_resnet_variant(
        variant, config.depth, width=config.width, preact=config.preact, num_classes=data.num_classes
    )
    model = instrument(model, record_activations=True, per_sample=config.per_sample).to(config.device)
    # One sequence of batches: the measurement, the training steps, the measurement after them.
    samples = len(data.train_labels)
    sampler = BatchSampler(samples, min(config.batch_size, samples), config.seed)
    steps = itertools.count()
    result = measure(model, data, config, sampler, steps)
    if config.steps > 0:
        loss = _train(model, data, config, sampler, steps, on_step)
        after = measure(model, data, config, sampler, steps)
        after["steps"] = config.steps
        after["final_loss"] = loss
        result["after_steps"] = after
    return result


def run(config: AnalysisConfig, log=print) -> dict:
    data = load_dataset(config.data, seed=config.seed)
    log(f"data: {data.describe()}")
    results = {}
    for variant in config.variants:
        start = time.perf_counter()
        results[variant] = analyze_variant(variant, config, data)
        log(f"  {variant}: {time.perf_counter() - start:.1f} s")
    return {
        "config": {**vars(config), "variants": list(config.variants), "data_description": data.describe()},
        "variants": results,
    }


# -- reporting ------------------------------------------------------------------------------------


def format_report(result: dict) -> str:
    lines = []
    config = result["config"]
    form = "pre-activation" if config["preact"] else "post-activation"
    for variant, r in result["variants"].items():
        parts = [("at initialisation", r)]
        if "after_steps" in r:
            parts.append((f"after {r['after_steps']['steps']} SGD steps", r["after_steps"]))
        for when, m in parts:
            lines.append(
                f"\n{variant} ({form} CIFAR ResNet-{config['depth']}, width {config['width']}), {when}"
            )
            lines.append(
                "  gradient variance at each residual block's output (skip stream), input side first;"
            )
            lines.append(
                "  ratio = this block's gradient variance / the next block's (>1: growth towards the input)"
            )
            header = (
                f"  {'block':<12} {'stage':>5} {'C':>4} {'grad var':>11} {'channel min..max':>23} "
                f"{'ratio':>7} {'act var':>11}"
            )
            lines.append(header)
            lines.append("  " + "-" * (len(header) - 2))
            for b in m["blocks"]:
                ratio = "" if b["ratio_to_next"] is None else f"{b['ratio_to_next']:.3f}"
                mark = "  <- stage transition" if b["transition_to_next"] else ""
                lines.append(
                    f"  {b['name']:<12} {b['stage']:>5} {b['channels']:>4} {b['grad_var']:>11.3e} "
                    f"{b['grad_var_min']:>11.2e}..{b['grad_var_max']:<10.2e} {ratio:>7} "
                    f"{b['act_var']:>11.3e}{mark}"
                )
            if "noise_scale" in m["summary"]:
                lines.extend(_noise_lines(m))
    lines.append(
        "\ncomparison (gradient variance): first/last block, largest and geometric-mean block-to-block "
        "ratio within stages, ratios across stage transitions"
    )
    lines.append(f"  {'variant':<12} {'first/last':>12} {'max in-stage':>13} {'geomean':>9}  transitions")
    for variant, r in result["variants"].items():
        s = r["summary"]
        fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"  {variant:<12} {fmt(s['first_over_last'], '12.3g')} "
            f"{fmt(s['within_stage_ratio_max'], '13.3f')} "
            f"{fmt(s['within_stage_ratio_geomean'], '9.3f')}  "
            + ", ".join(f"{t:.3f}" for t in s["transition_ratios"])
        )
    return "\n".join(lines)


def _noise_lines(m: dict) -> list[str]:
    """The per-sample table of one measurement (--per-sample): per block, B_simple of its BN
    parameters, mean GSNR of weight and bias, dy's between-sample variance share."""
    fmt = lambda v, f: "n/a" if v is None or math.isnan(v) else format(v, f)  # noqa: E731
    lines = [
        "  per-sample terms of the blocks' BN parameters (docs/noise.md): noise scale B_simple, "
        "mean GSNR, share of dy's variance between samples",
        f"  {'block':<12} {'B_simple':>10} {'GSNR w':>9} {'GSNR b':>9} {'between':>8}",
    ]
    for b in m["blocks"]:
        if "noise_scale" in b:
            lines.append(
                f"  {b['name']:<12} {fmt(b['noise_scale'], '10.3g')} {fmt(b['gsnr_weight'], '9.3g')} "
                f"{fmt(b['gsnr_bias'], '9.3g')} {fmt(b['dy_between_fraction'], '8.3f')}"
            )
    lines.append(f"  model (every BN parameter): B_simple {fmt(m['summary']['noise_scale'], '.4g')}")
    return lines


def plot(result: dict, path: str) -> None:
    """Two panels against block index: gradient variance and forward activation variance, log
    scale, one line per variant (and dashed after K steps when measured)."""
    matplotlib = require("matplotlib", "--plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_grad, ax_act) = plt.subplots(1, 2, figsize=(12, 4.5))
    config = result["config"]
    for variant, r in result["variants"].items():
        for key, style, suffix in (("blocks", "-", ""), ("after", "--", f" after {config['steps']} steps")):
            m = r if key == "blocks" else r.get("after_steps")
            if m is None:
                continue
            idx = [b["index"] for b in m["blocks"]]
            line = ax_grad.plot(
                idx, [b["grad_var"] for b in m["blocks"]], style, marker="o", ms=3, label=variant + suffix
            )[0]
            ax_act.plot(
                idx,
                [b["act_var"] for b in m["blocks"]],
                style,
                marker="o",
                ms=3,
                color=line.get_color(),
                label=variant + suffix,
            )
    blocks = next(iter(result["variants"].values()))["blocks"]
    for ax, title in (
        (ax_grad, "gradient variance at block output (backward)"),
        (ax_act, "activation variance at block output (forward)"),
    ):
        for b in blocks:
            if b["stage_start"] and b["index"] > 0:
                ax.axvline(b["index"] - 0.5, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("residual block (input side -> output side)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_grad.legend(fontsize=8)
    form = "pre-activation" if config["preact"] else "post-activation"
    fig.suptitle(
        f"{form} CIFAR ResNet-{config['depth']}, batch {config['batch_size']}, {config['data_description']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=32, help="CIFAR ResNet depth 6n+2 (default 32)")
    parser.add_argument(
        "--variants", default="all", help=f"comma list of {', '.join(VARIANTS)}, or 'all' (default)"
    )
    parser.add_argument("--preact", action="store_true", help="pre-activation blocks (He et al. 2016b)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=2, help="forward/backward passes measured per point")
    parser.add_argument(
        "--width",
        type=float,
        default=1.0,
        help="channel multiplier, a positive real (16, 32, 64 times width)",
    )
    parser.add_argument("--steps", type=int, default=0, help="also analyse after this many SGD steps")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate for --steps")
    parser.add_argument(
        "--data",
        default="builtin",
        help="'builtin' (bundled digits), a CIFAR-10/100 python-format folder, or an ImageFolder folder",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--per-sample",
        action="store_true",
        help="also the gradient noise scale, GSNR and dy variance split per block, from the per-sample "
        "terms of the BN parameter gradients (docs/noise.md)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of variance against block index")
    parser.add_argument(
        "--compare-shapes",
        nargs="?",
        const="default",
        metavar="DEPTHxWIDTH,...",
        help="compare BN+skip ResNet shapes (e.g. 56x1,32x1.4,20x2; alone: a default set at equal "
        "parameter count): variance spread at initialisation, and with --steps training loss and "
        "test accuracy over --seeds seeds",
    )
    parser.add_argument("--seeds", type=int, help="with --compare-shapes: seeds per shape (default 3)")


def config_from_args(args: argparse.Namespace) -> AnalysisConfig:
    check_min(args, ("batch_size", "batches"), 1)
    check_range(args, "width", 0, math.inf)
    check_min(args, ("steps",), 0)
    config = AnalysisConfig(
        depth=args.depth,
        variants=parse_variants(args.variants),
        preact=args.preact,
        batch_size=args.batch_size,
        batches=args.batches,
        width=args.width,
        steps=args.steps,
        lr=args.lr,
        data=args.data,
        device=str(resolve_device(args.device)),
        seed=args.seed,
        per_sample=args.per_sample,
    )
    if not config.variants:
        raise ValueError(f"--variants: none given; choose from {', '.join(VARIANTS)} or 'all'")
    check_choice(config, "variants", VARIANTS)
    return config


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = run(config)
    return publish(result, args, format_report, plot)


def publish(result: dict, args: argparse.Namespace, report, draw) -> int:
    """Prints ``report(result)``, writes it as JSON to --json and ``draw``s it to --plot."""
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(finite(result), f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        draw(result, args.plot)
        print(f"wrote {args.plot}")
    return 0
