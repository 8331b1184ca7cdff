"""First CPU microbenchmark (fp32, both layouts): fused op vs aten.native_batch_norm_backward vs
native + two torch.var_mean, on the BN shapes of a CIFAR ResNet-56 (batch 128) and a few of a
ResNet-50 (batch 32). Usage: python bench/bn_shapes.py [--repeats N] [--all-resnet50]"""

import argparse
import platform

import torch

import gradstats
from gradstats.bench import RESNET56_CIFAR, bench_shape, geometric_mean, resnet50_shapes, steady_allocator


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--all-resnet50", action="store_true", help="every distinct ResNet-50 BN shape")
    args = parser.parse_args()
    r50 = resnet50_shapes(32)
    shapes = [("resnet56-cifar", s) for s in RESNET56_CIFAR] + [
        ("resnet50", s) for s in (r50 if args.all_resnet50 else [r50[1], r50[7], r50[11]])
    ]
    steady = steady_allocator()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, gradstats CPU kernels "
          f"{gradstats.cpu_capability()}, {platform.processor() or platform.machine()}, "
          f"steady allocator: {'yes' if steady else 'no'}")
    print(f"{'preset':<15} {'shape':<20} {'layout':<14} {'fused ms':>9} {'native ms':>10} {'unfused ms':>11} "
          f"{'fused/native':>13} {'unfused/fused':>14}")
    rows = []
    for preset, shape in shapes:
        for channels_last in (False, True):
            row = bench_shape(shape, channels_last=channels_last, repeats=args.repeats)
            rows.append(row)
            print(f"{preset:<15} {str(shape):<20} {row.layout:<14} {row.fused_ms:>9.3f} {row.native_ms:>10.3f} "
                  f"{row.unfused_ms:>11.3f} {row.fused_vs_native:>13.2f} {row.unfused_vs_fused:>14.2f}")
    print(f"geometric mean: fused/native {geometric_mean([r.fused_vs_native for r in rows]):.3f}, "
          f"unfused/fused {geometric_mean([r.unfused_vs_fused for r in rows]):.2f}")


if __name__ == "__main__":
    main()
