"""`gradstats demo`: convert a CIFAR ResNet, take one SGD step on the built-in digits, and print
per-layer gradient statistics: what every BatchNorm layer received (dy) and passed on (dx)."""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from .. import __version__
from ..convert import batchnorms, convert_batchnorm
from ..models import cifar_resnet
from ..ops import cpu_capability, cuda_kernels_built
from ..records import layer_summaries
from .data import load_dataset
from .options import check_min, resolve_device
from .sampling import BatchSampler


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth, 6n+2 (default 20)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels-last", action="store_true", help="run in channels_last memory format")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    check_min(args, ("batch_size",), 1)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    print(
        f"gradstats {__version__}: CPU kernels {cpu_capability()}, "
        f"CUDA kernels {'built' if cuda_kernels_built() else 'not built'}; device {device}"
    )
    model = convert_batchnorm(cifar_resnet(args.depth)).to(device)
    layers = batchnorms(model)
    print(f"CIFAR ResNet-{args.depth}: {len(layers)} BatchNorm layers converted to GradStatBatchNorm2d")

    data = load_dataset("builtin", seed=args.seed)
    samples = len(data.train_labels)
    batch = BatchSampler(samples, min(args.batch_size, samples), args.seed).indices(0)
    images, labels = data.train_images[batch].to(device), data.train_labels[batch].to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    images = images.contiguous(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    start = time.perf_counter()
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    print(
        f"one SGD step on {len(labels)} built-in digit images (8x8 upscaled to 32x32): "
        f"loss {loss.item():.3f}, {elapsed * 1e3:.0f} ms\n"
    )

    print("Per-channel statistics of the gradient each layer received (dy) and passed on (dx),")
    print("averaged over the channels with finite values; var is the population variance over (N, H, W).")
    header = (
        f"{'layer':<22} {'C':>4} {'count':>7} {'mean dy':>11} {'var dy':>10} "
        f"{'mean dx':>11} {'var dx':>10} {'var dx/dy':>10}"
    )
    print(header)
    print("-" * len(header))
    bn_records, _ = layer_summaries(model, "last")  # the per-layer summary train and analyze use
    for r in bn_records:
        print(
            f"{r['name']:<22} {r['channels']:>4} {r['count']:>7} {r['dy_mean']:>11.3e} {r['dy_var']:>10.3e} "
            f"{r['dx_mean']:>11.3e} {r['dx_var']:>10.3e} {r['dx_over_dy']:>10.3g}"
        )
    return 0
