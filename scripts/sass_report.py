#!/usr/bin/env python3
"""What the GPU code does, read from the compiled SASS, without a GPU (issue 10).

    python scripts/sass_report.py                      compile csrc/cuda/*.cu for sm_90, report
    python scripts/sass_report.py --object build/.../gradstats/_C.abi3.so   report on a build
    python scripts/sass_report.py --json out.json --check

Per kernel (short names: pass, layout, dtype, +dx when it writes grad_input, +ps for per-sample
sums): registers, stack frame, spill bytes (ptxas -v, when this script compiled the source),
spill instructions (LDL/STL) in all and inside loops that load from global memory, static shared
memory, theoretical occupancy on the chosen architecture (from registers, the kernel's launch
config and shared memory; sm_90 limits by default) and the global loads and stores by width.

Targets of issue 10 (flagged per kernel; --check exits 1 when one is missed, otherwise the exit
status is 0 unless the tool itself fails):
  spill       spill bytes (or, without ptxas output, a stack frame) in a float/half/bfloat16 kernel
  no-ldg128   a streaming pass (bn_pass_kernel) without a single 128-bit global load
  occupancy   theoretical occupancy below 50%

Tools: cuobjdump and nvdisasm (cuobjdump -sass runs nvdisasm), searched on PATH, then in the
`nvidia-cuda-cuobjdump` / `nvidia-cuda-nvdisasm` wheels (pip install nvidia-cuda-cuobjdump
nvidia-cuda-nvdisasm; both are in the `test` extra), then in the `triton` package's copies.
Compiling needs nvcc on PATH; the flags are those setup.py and torch's CUDAExtension pass.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["csrc/cuda/bn_backward_stats_kernel.cu", "csrc/cuda/record_grad_stats_kernel.cu"]
# setup.py's nvcc flags, plus what torch.utils.cpp_extension adds to every CUDA source
# (COMMON_NVCC_FLAGS, and -std=c++20 since torch 2.9); the arch comes from --arch.
NVCC_FLAGS = [
    "-O3",
    "-lineinfo",
    "--expt-relaxed-constexpr",
    "-std=c++20",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "-Xptxas",
    "-v",
]

# Threads per block of each kernel as launched (csrc/cuda/*.cu): kThreads = 512 for the pass
# kernels (NCHW: 512 x 1; channels_last: TX x TY = 512) and the finish kernels; 256 for record.
LAUNCH_THREADS = {"bn_pass_kernel": 512, "finish_kernel": 512, "record_grad_stats_kernel": 256}
DEFAULT_THREADS = 256


@dataclass(frozen=True)
class SmLimits:
    """Per-multiprocessor limits of one architecture (CUDA occupancy calculator's terms)."""

    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers, allocated per warp
    sub_partitions: int = 4  # the register file is split among 4 schedulers
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024
    smem_alloc_unit: int = 128
    reserved_smem_per_block: int = 1024  # the driver's, per block (sm_80 and later)
    warp_size: int = 32


LIMITS = {
    "sm_90": SmLimits(),
    "sm_80": SmLimits(threads_per_sm=2048, smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
}


# ---- occupancy ---------------------------------------------------------------------------------
@dataclass
class Occupancy:
    blocks: int  # resident blocks per SM
    warps: int  # resident warps per SM
    percent: float  # warps / max warps
    limiter: str  # regs, smem, threads or blocks (the smallest limit; ties name the first)
    by: dict = field(default_factory=dict)  # blocks per SM under each limit


def occupancy(regs: int, threads: int, smem_block: int, lim: SmLimits = LIMITS["sm_90"]) -> Occupancy:
    """Theoretical occupancy of a kernel: `regs` per thread, `threads` per block and `smem_block`
    bytes of static + dynamic shared memory per block (without the driver's reserved 1 KB, which
    is added here), as cudaOccupancyMaxActiveBlocksPerMultiprocessor computes it."""
    ws = lim.warp_size
    warps_per_block = math.ceil(threads / ws)
    max_warps = lim.threads_per_sm // ws
    by = {}
    by["threads"] = lim.threads_per_sm // (warps_per_block * ws)
    by["blocks"] = lim.blocks_per_sm
    if regs > 0:
        regs_per_warp = math.ceil(regs * ws / lim.reg_alloc_unit) * lim.reg_alloc_unit
        per_partition = lim.regs_per_sm // lim.sub_partitions
        warps = (per_partition // regs_per_warp) * lim.sub_partitions
        by["regs"] = warps // warps_per_block if regs <= lim.max_regs_per_thread else 0
    else:
        by["regs"] = lim.blocks_per_sm
    smem = smem_block + lim.reserved_smem_per_block
    smem = math.ceil(smem / lim.smem_alloc_unit) * lim.smem_alloc_unit
    by["smem"] = 0 if smem_block > lim.smem_per_block else lim.smem_per_sm // smem
    order = ["regs", "smem", "threads", "blocks"]
    blocks = min(by[k] for k in order)
    limiter = next(k for k in order if by[k] == blocks)
    warps = blocks * warps_per_block
    return Occupancy(blocks, warps, 100.0 * warps / max_warps, limiter, {k: by[k] for k in order})


# ---- parsing cuobjdump and ptxas output ---------------------------------------------------------
def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """`cuobjdump -res-usage`: {mangled kernel: {REG, STACK, SHARED, LOCAL, ...}}; the first
    occurrence of a name wins (run cuobjdump with -arch to pick one architecture)."""
    out: dict[str, dict[str, int]] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+?):?\s*$", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            fields = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            out.setdefault(name, fields)
            name = None
    return out


def parse_ptxas(text: str) -> dict[str, dict[str, int]]:
    """`ptxas -v` (nvcc -Xptxas -v) output: {mangled kernel: {stack, spill_stores, spill_loads,
    regs, smem}}; smem is the kernel's own static shared memory (no reserved 1 KB)."""
    out: dict[str, dict[str, int]] = {}
    name = None
    for line in text.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = {"stack": 0, "spill_stores": 0, "spill_loads": 0, "regs": 0, "smem": 0}
            continue
        if name is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[name].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[name]["regs"] = int(m[1])
            s = re.search(r"(\d+) bytes smem", line)
            out[name]["smem"] = int(s[1]) if s else 0
            name = None
    return out


# LDG.E.128, LDG.E.128.CONSTANT, LDG.E.EL.128, LDG.E.LTC128B.128 (LTC128B is an L2 hint, not a width)
_WIDTH = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128, "256": 256}
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def access_width(opcode: str) -> int:
    """Bits moved by a load/store opcode: the width modifier, 32 when there is none."""
    for part in opcode.split(".")[1:]:
        if part in _WIDTH:
            return _WIDTH[part]
    return 32


@dataclass
class SassCounts:
    instructions: int = 0
    ldg: dict = field(default_factory=dict)  # width in bits -> count (LDG, and LDGSTS)
    stg: dict = field(default_factory=dict)  # width -> count
    ldl: int = 0  # local loads (spill reloads, local arrays)
    stl: int = 0
    loop_ldl: int = 0  # of those, inside an innermost loop that loads from global memory
    loop_stl: int = 0
    loop_instructions: int = 0  # instructions of the streaming loop (innermost, most LDG)
    loop_ldg: int = 0  # global loads in it

    def ldg_wide(self, bits: int = 128) -> int:
        return sum(n for w, n in self.ldg.items() if w >= bits)

    def stg_wide(self, bits: int = 128) -> int:
        return sum(n for w, n in self.stg.items() if w >= bits)


def parse_sass(text: str) -> dict[str, SassCounts]:
    """`cuobjdump -sass`: per kernel, global and local loads and stores. A loop is the address
    range of a backward branch ([target, branch]); loop_ldl/loop_stl count the local accesses in
    the innermost loops that contain a global load (the streaming loops; a cold re-read loop
    counts too)."""
    kernels: dict[str, list[tuple[int, str, str]]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s*:\s*(\S+)", line)
        if m:
            cur = kernels.setdefault(m.group(1), []) if m.group(1) not in kernels else None
            continue
        if cur is None:
            continue
        m = _INSTR.search(line)
        if m:
            cur.append((int(m.group(1), 16), m.group(2), m.group(3)))
    out = {}
    for name, instrs in kernels.items():
        c = SassCounts(instructions=len(instrs))
        loops = []
        for addr, op, args in instrs:
            base = op.split(".")[0]
            if base in ("LDG", "LDGSTS"):
                w = access_width(op)
                c.ldg[w] = c.ldg.get(w, 0) + 1
            elif base == "STG":
                w = access_width(op)
                c.stg[w] = c.stg.get(w, 0) + 1
            elif base == "LDL":
                c.ldl += 1
            elif base == "STL":
                c.stl += 1
            elif base == "BRA":
                t = re.search(r"0x([0-9a-f]+)", args)
                if t and int(t.group(1), 16) <= addr:
                    loops.append((int(t.group(1), 16), addr))
        streaming = [
            (lo, hi) for lo, hi in loops if any(lo <= a <= hi and op.startswith("LDG") for a, op, _ in instrs)
        ]
        # innermost: containing no other loop that loads (the unrolled loads, not the chunk loop around)
        hot = [
            (lo, hi)
            for lo, hi in streaming
            if not any((lo, hi) != (a, b) and lo <= a and b <= hi for a, b in streaming)
        ]
        if hot:  # the streaming loop: the innermost loop with the most global loads
            lo, hi = max(
                hot, key=lambda r: (sum(r[0] <= a <= r[1] and op.startswith("LDG") for a, op, _ in instrs), r)
            )
            body = [op for a, op, _ in instrs if lo <= a <= hi]
            c.loop_instructions = len(body)
            c.loop_ldg = sum(op.startswith("LDG") for op in body)
        for addr, op, _ in instrs:
            if op.startswith(("LDL", "STL")) and any(lo <= addr <= hi for lo, hi in hot):
                if op.startswith("LDL"):
                    c.loop_ldl += 1
                else:
                    c.loop_stl += 1
        out[name] = c
    return out


# ---- kernel names ------------------------------------------------------------------------------
PASSES = {0: "reduce", 1: "grad_input", 2: "eval", 3: "moments"}
FINISH = {1: "finish[dy]", 3: "finish[dy+grads]", 4: "finish[dx]", 7: "finish[all]"}
DTYPES = {"f": "f32", "d": "f64", "6__half": "f16", "13__nv_bfloat16": "bf16"}
_DT = r"(f|d|6__half|13__nv_bfloat16)"


@dataclass
class KernelName:
    kind: str  # bn_pass_kernel, finish_kernel, record_grad_stats_kernel or the mangled name
    short: str
    dtype: str = ""  # storage type (pass kernels) or accumulation type (finish)
    streaming: bool = False  # a pass over the tensors (bn_pass_kernel)
    template: dict = field(default_factory=dict)


def kernel_name(mangled: str) -> KernelName:
    """Short name from the mangled one: templates of csrc/cuda/bn_backward_stats_kernel.cu,
    bn_pass_kernel<Pass P, bool kWrite, bool kChannelsLast, bool kPerSample, scalar_t> and
    finish_kernel<int kWhat, acc_t>."""
    m = re.search(r"14bn_pass_kernelILNS_4PassE(\d)ELb([01])ELb([01])ELb([01])E" + _DT + "E", mangled)
    if m:
        p, write, cl, ps, dt = int(m[1]), m[2] == "1", m[3] == "1", m[4] == "1", DTYPES[m[5]]
        short = f"{PASSES.get(p, f'pass{p}')} {'cl' if cl else 'nchw'} {dt}"
        short += " +dx" if write else ""
        short += " +ps" if ps else ""
        tmpl = dict(pass_=PASSES.get(p, str(p)), write=write, channels_last=cl, per_sample=ps)
        return KernelName("bn_pass_kernel", short, dt, True, tmpl)
    m = re.search(r"13finish_kernelILi(\d+)E" + _DT + "E", mangled)
    if m:
        what, dt = int(m[1]), DTYPES[m[2]]
        return KernelName(
            "finish_kernel", f"{FINISH.get(what, f'finish[{what}]')} {dt}", dt, False, {"what": what}
        )
    if "record_grad_stats_kernel" in mangled:
        return KernelName("record_grad_stats_kernel", "record f64", "f64")
    return KernelName(mangled, demangle(mangled))


def demangle(mangled: str) -> str:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if tool is None:
        return mangled
    try:
        out = subprocess.run([tool, mangled], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return mangled
    return out.replace("(anonymous namespace)::", "") or mangled


# ---- tools -------------------------------------------------------------------------------------
def _package_dirs(package: str) -> list[Path]:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def find_tool(name: str) -> str | None:
    """`name` on PATH, else in the NVIDIA wheels (nvidia/<cuXX or cuda_NAME>/bin), else triton's."""
    found = shutil.which(name)
    if found:
        return found
    for d in _package_dirs("nvidia"):
        for cand in sorted(d.glob(f"*/bin/{name}"), reverse=True):  # cu13 before cu12
            if os.access(cand, os.X_OK):
                return str(cand)
    for d in _package_dirs("triton"):
        cand = d / "backends" / "nvidia" / "bin" / name
        if os.access(cand, os.X_OK):
            return str(cand)
    return None


def tool_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1] if out.strip() else "?"


def compile_sources(arch: str, workdir: Path, sources=SOURCES) -> tuple[list[Path], str, list[str]]:
    """Compiles the .cu files into workdir (in parallel); returns the objects, ptxas -v output and
    the command line of the first."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("sass_report: nvcc not found on PATH (or pass --object)")

    def one(src: str):
        obj = workdir / (Path(src).stem + ".o")
        cmd = [
            nvcc,
            f"-arch={arch}",
            *NVCC_FLAGS,
            f"-I{ROOT / 'csrc'}",
            "-c",
            str(ROOT / src),
            "-o",
            str(obj),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"sass_report: nvcc failed on {src}:\n{r.stdout}{r.stderr}")
        return obj, r.stdout + r.stderr, cmd

    with ThreadPoolExecutor(len(sources)) as pool:
        results = list(pool.map(one, sources))
    return [r[0] for r in results], "\n".join(r[1] for r in results), results[0][2]


def run_cuobjdump(cuobjdump: str, nvdisasm: str | None, what: str, obj: Path, arch: str) -> str:
    env = dict(os.environ)
    if nvdisasm:  # cuobjdump -sass runs nvdisasm from PATH
        env["PATH"] = os.path.dirname(nvdisasm) + os.pathsep + env.get("PATH", "")
    r = subprocess.run([cuobjdump, "-arch", arch, what, str(obj)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"sass_report: cuobjdump {what} {obj} failed:\n{r.stderr}")
    return r.stdout


# ---- the report --------------------------------------------------------------------------------
@dataclass
class KernelReport:
    name: str
    mangled: str
    kind: str
    dtype: str
    streaming: bool
    template: dict
    threads: int
    regs: int
    stack: int  # stack frame bytes per thread (cuobjdump STACK)
    local: int  # cuobjdump LOCAL
    spill_stores: int | None  # bytes, from ptxas -v (None: not compiled here)
    spill_loads: int | None
    ldl: int
    stl: int
    loop_ldl: int
    loop_stl: int
    loop_instructions: int
    loop_ldg: int
    smem: int  # the kernel's static shared memory, without the reserved 1 KB
    occupancy: dict
    ldg: dict
    stg: dict
    ldg128: int
    stg128: int
    flags: list


def flags_for(k: KernelReport) -> list[str]:
    f = []
    if k.dtype in ("f32", "f16", "bf16"):
        spilled = k.spill_stores or k.spill_loads if k.spill_stores is not None else k.stack or k.local
        if spilled:
            f.append("spill")
    if k.streaming and k.ldg128 == 0:
        f.append("no-ldg128")
    if k.occupancy["percent"] < 50:
        f.append("occupancy")
    return f


def _order(k: KernelReport):
    kinds = ["bn_pass_kernel", "finish_kernel", "record_grad_stats_kernel"]
    dtypes = ["f32", "f16", "bf16", "f64"]
    t = k.template
    passes = list(PASSES.values())
    return (
        kinds.index(k.kind) if k.kind in kinds else len(kinds),
        passes.index(t["pass_"]) if "pass_" in t else t.get("what", 0),
        t.get("channels_last", False),
        dtypes.index(k.dtype) if k.dtype in dtypes else len(dtypes),
        t.get("write", False),
        t.get("per_sample", False),
        k.name,
    )


def build_report(
    res: dict, sass: dict, ptxas: dict, lim: SmLimits, threads_override: dict
) -> list[KernelReport]:
    rows = []
    for mangled, r in res.items():
        kn = kernel_name(mangled)
        threads = threads_override.get(kn.kind) or LAUNCH_THREADS.get(kn.kind, DEFAULT_THREADS)
        px = ptxas.get(mangled)
        shared = r.get("SHARED", 0)
        if px is not None:
            smem = px["smem"]
        else:  # cuobjdump counts the reserved 1 KB in a kernel's shared section once it has one
            smem = (
                max(0, shared - lim.reserved_smem_per_block)
                if shared >= lim.reserved_smem_per_block
                else shared
            )
        occ = occupancy(r.get("REG", 0), threads, smem, lim)
        sc = sass.get(mangled, SassCounts())
        k = KernelReport(
            name=kn.short,
            mangled=mangled,
            kind=kn.kind,
            dtype=kn.dtype,
            streaming=kn.streaming,
            template=kn.template,
            threads=threads,
            regs=r.get("REG", 0),
            stack=r.get("STACK", 0),
            local=r.get("LOCAL", 0),
            spill_stores=px["spill_stores"] if px else None,
            spill_loads=px["spill_loads"] if px else None,
            ldl=sc.ldl,
            stl=sc.stl,
            loop_ldl=sc.loop_ldl,
            loop_stl=sc.loop_stl,
            loop_instructions=sc.loop_instructions,
            loop_ldg=sc.loop_ldg,
            smem=smem,
            occupancy=asdict(occ),
            ldg=dict(sorted(sc.ldg.items())),
            stg=dict(sorted(sc.stg.items())),
            ldg128=sc.ldg_wide(),
            stg128=sc.stg_wide(),
            flags=[],
        )
        k.flags = flags_for(k)
        rows.append(k)
    rows.sort(key=_order)
    return rows


def _widths(d: dict) -> str:
    return "/".join(str(d.get(w, 0)) for w in (128, 64, 32, 16))


LEGEND = """\
thr: threads per block as launched; stack: stack frame bytes per thread; spill st/ld: bytes
(ptxas -v; '-' when reading a built object); LDL/STL: local-memory instructions, 'inner': those in
innermost loops that load global memory; loop: instructions / global loads of the streaming loop
(the innermost with the most loads); smem: static shared bytes per block (the occupancy adds the
1 KB the driver reserves); blk/SM, occ: theoretical occupancy and what limits it; LDG/STG: global
loads/stores by width in bits (static counts)."""


def format_table(rows: list[KernelReport]) -> str:
    head = (
        f"{'kernel':<34} {'thr':>4} {'reg':>4} {'stack':>5} {'spill st/ld':>11} {'LDL/STL':>8} "
        f"{'inner':>7} {'loop':>8} {'smem':>6} {'blk/SM':>6} {'occ':>5} {'limit':>6} "
        f"{'LDG 128/64/32/16':>17} {'STG 128/64/32/16':>17}  flags"
    )
    lines = [head, "-" * len(head)]
    for k in rows:
        spill = "-" if k.spill_stores is None else f"{k.spill_stores}/{k.spill_loads}"
        o = k.occupancy
        lines.append(
            f"{k.name:<34} {k.threads:>4} {k.regs:>4} {k.stack:>5} {spill:>11} {f'{k.ldl}/{k.stl}':>8} "
            f"{f'{k.loop_ldl}/{k.loop_stl}':>7} {f'{k.loop_instructions}/{k.loop_ldg}':>8} {k.smem:>6} "
            f"{o['blocks']:>6} {o['percent']:>4.0f}% "
            f"{o['limiter']:>6} {_widths(k.ldg):>17} {_widths(k.stg):>17}  {','.join(k.flags)}"
        )
    return "\n".join(lines)


def summary(rows: list[KernelReport]) -> str:
    n = {f: sum(f in k.flags for k in rows) for f in ("spill", "no-ldg128", "occupancy")}
    streaming = sum(k.streaming for k in rows)
    return (
        f"{len(rows)} kernels ({streaming} streaming passes); targets missed: "
        f"spills in float/half/bf16 kernels {n['spill']}, streaming passes without 128-bit loads "
        f"{n['no-ldg128']}, occupancy < 50% {n['occupancy']}"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--object", type=Path, help=".o/.so/.cubin/fatbin to read (default: compile csrc/cuda/*.cu)"
    )
    ap.add_argument("--arch", default="sm_90", help="architecture to compile for and read (default sm_90)")
    ap.add_argument("--json", type=Path, help="write the report as JSON here")
    ap.add_argument("--check", action="store_true", help="exit 1 when a kernel misses a target")
    ap.add_argument(
        "--threads", action="append", default=[], metavar="KERNEL=N", help="threads per block of a kernel"
    )
    ap.add_argument("--keep", type=Path, help="compile into this folder (kept) instead of a temporary one")
    args = ap.parse_args(argv)

    if args.arch not in LIMITS:
        ap.error(f"no limits known for {args.arch} (known: {', '.join(LIMITS)})")
    lim = LIMITS[args.arch]
    threads_override = {}
    for t in args.threads:
        k, _, v = t.partition("=")
        threads_override[k] = int(v)
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    if cuobjdump is None:
        raise SystemExit(
            "sass_report: cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
        )
    if nvdisasm is None:
        raise SystemExit(
            "sass_report: nvdisasm not found, which cuobjdump -sass needs (pip install nvidia-cuda-nvdisasm)"
        )

    meta = {"arch": args.arch, "cuobjdump": cuobjdump, "cuobjdump_version": tool_version(cuobjdump)}
    meta["nvdisasm"] = nvdisasm
    ptxas_text = ""
    with tempfile.TemporaryDirectory() as tmp:
        if args.object:
            objects = [args.object]
            meta["object"] = str(args.object)
        else:
            work = args.keep or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            objects, ptxas_text, cmd = compile_sources(args.arch, work)
            meta["nvcc"] = " ".join(cmd)
            meta["nvcc_version"] = tool_version(shutil.which("nvcc"))
        res, sass = {}, {}
        for obj in objects:
            for k, v in parse_res_usage(
                run_cuobjdump(cuobjdump, nvdisasm, "-res-usage", obj, args.arch)
            ).items():
                res.setdefault(k, v)
            for k, v in parse_sass(run_cuobjdump(cuobjdump, nvdisasm, "-sass", obj, args.arch)).items():
                sass.setdefault(k, v)
    if not res:
        raise SystemExit(f"sass_report: no {args.arch} kernels found in {', '.join(map(str, objects))}")
    rows = build_report(res, sass, parse_ptxas(ptxas_text), lim, threads_override)

    src = meta.get("object") or f"nvcc {meta['nvcc_version']}"
    print(f"SASS for {args.arch} ({src}; cuobjdump {meta['cuobjdump_version']})")
    print(format_table(rows))
    print(LEGEND)
    print(summary(rows))
    if args.json:
        data = {
            "meta": meta,
            "limits": asdict(lim),
            "summary": summary(rows),
            "kernels": [asdict(k) for k in rows],
        }
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    return 1 if args.check and any(k.flags for k in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
