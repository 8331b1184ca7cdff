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
import json
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..convert import batchnorms, instrument, probes
from ..extras import require
from ..metrics import layer_summaries
from ..models import VARIANTS, cifar_resnet_variant
from .data import ImageData, load_dataset
from .logs import finite
from .options import check_min, resolve_device

MAIN_VARIANTS = ["bn_skip", "bn", "skip", "plain"]


@dataclass
class AnalysisConfig:
    depth: int = 32
    variants: tuple[str, ...] = tuple(VARIANTS)
    preact: bool = False
    batch_size: int = 128
    batches: int = 2
    width: int = 1
    steps: int = 0
    lr: float = 0.05
    data: str = "builtin"
    device: str = "cpu"
    seed: int = 0


def parse_variants(text: str) -> tuple[str, ...]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if names == ["all"]:
        return tuple(VARIANTS)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ValueError(
            f"--variants: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(VARIANTS)} or 'all'"
        )
    return tuple(dict.fromkeys(names))


def _stage_of(model: nn.Module) -> dict[int, int]:
    """Block index -> stage number (1-based), from the model's stage containers."""
    stages = {}
    index = 0
    for stage, layer in enumerate((model.layer1, model.layer2, model.layer3), start=1):
        for _ in layer:
            stages[index] = stage
            index += 1
    return stages


def _batches(data: ImageData, config: AnalysisConfig, count: int, generator: torch.Generator):
    n = len(data.train_labels)
    size = min(config.batch_size, n)
    for _ in range(count):
        index = torch.randperm(n, generator=generator)[:size]
        yield (data.train_images[index].to(config.device), data.train_labels[index].to(config.device))


def measure(model: nn.Module, data: ImageData, config: AnalysisConfig, generator: torch.Generator) -> dict:
    """Block and BN-layer statistics over ``config.batches`` forward/backward passes."""
    block_probes = probes(model)
    for _, module in block_probes + batchnorms(model):
        module.reset_grad_stats()
    # Summed on the device (float64, the same arithmetic as in Python floats), read once after.
    act_var = [0.0] * len(block_probes)
    act_mean = [0.0] * len(block_probes)
    model.train()
    for images, labels in _batches(data, config, config.batches, generator):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        for i, (_, probe) in enumerate(block_probes):
            act = probe.last_activation_stats
            act_var[i] = act_var[i] + act.var.mean() / config.batches
            act_mean[i] = act_mean[i] + act.mean.mean() / config.batches
    model.zero_grad(set_to_none=True)
    act_var, act_mean = [float(v) for v in act_var], [float(v) for v in act_mean]

    stages = _stage_of(model)
    bn_records, block_records = layer_summaries(model)  # the per-layer summary train logs too
    blocks = []
    for i, ((name, probe), record) in enumerate(zip(block_probes, block_records)):
        var = probe.accumulated_grad_stats.grad_output.var
        var = var[~var.isnan()]  # channels with finite values, as in the averages
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
                "grad_var_cv": (var.std(correction=0) / var.mean()).item() if var.numel() > 1 else 0.0,
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
        for record in bn_records
    ]
    return {"blocks": blocks, "bn_layers": bn_layers, "summary": summarize(blocks)}


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


def _train(model: nn.Module, data: ImageData, config: AnalysisConfig, generator: torch.Generator) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    loss = float("nan")
    for images, labels in _batches(data, config, config.steps, generator):
        optimizer.zero_grad(set_to_none=True)
        out = F.cross_entropy(model(images), labels)
        out.backward()
        optimizer.step()
        loss = out.item()
    return loss


def analyze_variant(variant: str, config: AnalysisConfig, data: ImageData) -> dict:
    torch.manual_seed(config.seed)
    model = cifar_resnet_variant(
        variant, config.depth, width=config.width, preact=config.preact, num_classes=data.num_classes
    )
    model = instrument(model, record_activations=True).to(config.device)
    generator = torch.Generator().manual_seed(config.seed + 1)
    result = measure(model, data, config, generator)
    if config.steps > 0:
        loss = _train(model, data, config, generator)
        after = measure(model, data, config, generator)
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
    lines.append(
        "\ncomparison (gradient variance): first/last block, largest and geometric-mean block-to-block "
        "ratio within stages, ratios across stage transitions"
    )
    lines.append(f"  {'variant':<12} {'first/last':>12} {'max in-stage':>13} {'geomean':>9}  transitions")
    for variant, r in result["variants"].items():
        s = r["summary"]
        fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"  {variant:<12} {fmt(s['first_over_last'], '12.3g')} {fmt(s['within_stage_ratio_max'], '13.3f')} "
            f"{fmt(s['within_stage_ratio_geomean'], '9.3f')}  "
            + ", ".join(f"{t:.3f}" for t in s["transition_ratios"])
        )
    return "\n".join(lines)


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
    parser.add_argument("--width", type=int, default=1, help="channel multiplier (16, 32, 64 times width)")
    parser.add_argument("--steps", type=int, default=0, help="also analyse after this many SGD steps")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate for --steps")
    parser.add_argument(
        "--data",
        default="builtin",
        help="'builtin' (bundled digits), a CIFAR-10/100 python-format folder, or an ImageFolder folder",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of variance against block index")


def config_from_args(args: argparse.Namespace) -> AnalysisConfig:
    check_min(args, ("batch_size", "batches", "width"), 1)
    check_min(args, ("steps",), 0)
    return AnalysisConfig(
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
    )


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = run(config)
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(finite(result), f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0
