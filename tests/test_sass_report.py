"""scripts/sass_report.py: parsing of cuobjdump / ptxas output and the occupancy arithmetic on
canned text, and one real run on the kernels when nvcc, cuobjdump and nvdisasm are available."""

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("sass_report", ROOT / "scripts" / "sass_report.py")
sr = importlib.util.module_from_spec(_spec)
sys.modules["sass_report"] = sr  # dataclasses look their module up by name
_spec.loader.exec_module(sr)

# Mangled names as nvcc 13.0 emits them for csrc/cuda/bn_backward_stats_kernel.cu.
_NS = "_ZN9gradstats4cuda60_GLOBAL__N__eeb37b0c_27_bn_backward_stats_kernel_cu_ead76b6a1"
REDUCE_NCHW_F32 = _NS + "4bn_pass_kernelILNS_4PassE0ELb0ELb0ELb0EfEEvNS1_8PassArgsE"
EVAL_CL_BF16_DX_PS = _NS + "4bn_pass_kernelILNS_4PassE2ELb1ELb1ELb1E13__nv_bfloat16EEvNS1_8PassArgsE"
FINISH_ALL_F32 = _NS + "3finish_kernelILi7EfEEvNS1_10FinishArgsE"
RECORD = (
    "_ZN9gradstats4cuda60_GLOBAL__N__5a744267_27_record_grad_stats_kernel_cu_a055d85b2"
    "4record_grad_stats_kernelEPdPKdxxd"
)

RES_USAGE = f"""
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
identifier = csrc/cuda/bn_backward_stats_kernel.cu

Resource usage:
 Common:
  GLOBAL:0
 Function {REDUCE_NCHW_F32}:
  REG:64 STACK:40 SHARED:41984 LOCAL:0 CONSTANT[0]:720 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {EVAL_CL_BF16_DX_PS}:
  REG:64 STACK:168 SHARED:50176 LOCAL:0 CONSTANT[0]:720 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {FINISH_ALL_F32}:
  REG:70 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:616 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {RECORD}:
  REG:64 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

PTXAS = f"""ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '{REDUCE_NCHW_F32}' for 'sm_90'
ptxas info    : Function properties for {REDUCE_NCHW_F32}
    40 bytes stack frame, 120 bytes spill stores, 80 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 40 bytes cumulative stack size, 40960 bytes smem
ptxas info    : Compile time = 343.122 ms
ptxas info    : Compiling entry function '{FINISH_ALL_F32}' for 'sm_90'
ptxas info    : Function properties for {FINISH_ALL_F32}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 70 registers, used 0 barriers
"""

# A made-up kernel body in cuobjdump -sass form: a chunk loop (0x0040-0x01a0) around a streaming
# loop (0x0060-0x0110) with two 32-bit and one 128-bit global load and one spill reload; a 64-bit
# store, a spill store outside the loops, an L2-hinted 128-bit load and a 16-bit one.
SASS = f"""
\tcode for sm_90
\t\tFunction : {REDUCE_NCHW_F32}
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
                                                                          /* 0x000ff00000000800 */
        /*0010*/                   STL.64 [R1], RZ ;                      /* 0x000000ff01007387 */
        /*0020*/                   LDG.E.LTC128B.128 R4, desc[UR4][R2.64] ;  /* 0x0000000402047981 */
        /*0030*/                   LDG.E.U16 R8, desc[UR4][R2.64] ;       /* 0x0000000402087981 */
        /*0040*/                   IADD3 R0, R0, 0x1, RZ ;                /* 0x0000000100007810 */
        /*0060*/              @!P0 LDG.E R10, desc[UR4][R2.64] ;          /* 0x0000000402 */
        /*0070*/               @P1 LDG.E R11, desc[UR4][R6.64] ;          /* 0x0000000406 */
        /*0080*/                   LDG.E.128.CONSTANT R12, desc[UR4][R6.64] ;  /* 0x0000000406 */
        /*0090*/                   LDL.LU.64 R16, [R1] ;                  /* 0x0000000001 */
        /*00a0*/                   FADD R10, R10, R11 ;                   /* 0x0000000b0a */
        /*0110*/               @P2 BRA 0x60 ;                             /* 0xfffffffc00 */
        /*0120*/                   STG.E.64 desc[UR4][R4.64], R22 ;       /* 0x0000001604 */
        /*0130*/                   STG.E.128 desc[UR4][R4.64], R24 ;      /* 0x0000001804 */
        /*01a0*/               @P3 BRA 0x40 ;                             /* 0xfffffffc00 */
        /*01b0*/                   EXIT ;                                 /* 0x000000000000794d */
        /*01c0*/                   BRA 0x1c0;                             /* 0xfffffffc00fc7947 */
\t\t..........
"""


# ---- occupancy ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "regs, threads, smem, blocks, percent, limiter",
    [
        (64, 512, 0, 2, 50.0, "regs"),  # 2048 regs/warp x 16 warps = 32768 per block
        (32, 512, 0, 4, 100.0, "regs"),  # regs and threads both allow 4; regs named first
        (65, 512, 0, 1, 25.0, "regs"),  # 65 x 32 = 2080 -> 2304 per warp: 7 warps per scheduler
        (70, 512, 0, 1, 25.0, "regs"),
        (128, 256, 0, 2, 25.0, "regs"),
        (255, 128, 0, 2, 12.5, "regs"),  # 8192 regs/warp: 2 warps per scheduler, 8 per SM
        (16, 256, 0, 8, 100.0, "threads"),
        (16, 32, 0, 32, 50.0, "blocks"),  # 32 blocks of one warp each
        (32, 256, 40960, 5, 62.5, "smem"),  # 40 KB + 1 KB reserved: 228 KB / 41 KB = 5
        (32, 256, 48 * 1024, 4, 50.0, "smem"),  # 49 KB per block
        (32, 128, 100 * 1024, 2, 12.5, "smem"),  # 101 KB: two fit in 228 KB
        (32, 128, 114 * 1024, 1, 6.25, "smem"),  # 115 KB: one
        (32, 128, 227 * 1024, 1, 6.25, "smem"),  # the per-block maximum still runs
        (32, 128, 228 * 1024, 0, 0.0, "smem"),  # over it: no block fits
        (64, 512, 40960, 2, 50.0, "regs"),  # the pass kernels: 64 regs, 40 KB, 512 threads
        (0, 512, 0, 4, 100.0, "threads"),
    ],
)
def test_occupancy_sm90(regs, threads, smem, blocks, percent, limiter):
    occ = sr.occupancy(regs, threads, smem)
    assert (occ.blocks, occ.percent, occ.limiter) == (blocks, percent, limiter)


def test_occupancy_smem_rounding_and_reserve():
    # 45 KB + 1 KB reserve = 47104 bytes: 233472 // 47104 = 4 blocks; a byte more rounds up to the
    # next 128-byte unit and still fits 4; 56 KB + 1 KB = 58368: 4; 57 KB + 1 KB: 3.
    assert sr.occupancy(32, 64, 45 * 1024).by["smem"] == 4
    assert sr.occupancy(32, 64, 45 * 1024 + 1).by["smem"] == 4
    assert sr.occupancy(32, 64, 56 * 1024).by["smem"] == 4
    assert sr.occupancy(32, 64, 57 * 1024).by["smem"] == 3


# ---- parsing -----------------------------------------------------------------------------------
def test_parse_res_usage():
    res = sr.parse_res_usage(RES_USAGE)
    assert set(res) == {REDUCE_NCHW_F32, EVAL_CL_BF16_DX_PS, FINISH_ALL_F32, RECORD}
    assert res[REDUCE_NCHW_F32]["REG"] == 64
    assert res[REDUCE_NCHW_F32]["STACK"] == 40
    assert res[REDUCE_NCHW_F32]["SHARED"] == 41984
    assert res[EVAL_CL_BF16_DX_PS]["STACK"] == 168
    assert res[FINISH_ALL_F32]["REG"] == 70
    assert res[RECORD]["CONSTANT[0]"] == 568


def test_parse_ptxas():
    px = sr.parse_ptxas(PTXAS)
    assert px[REDUCE_NCHW_F32] == {
        "stack": 40,
        "spill_stores": 120,
        "spill_loads": 80,
        "regs": 64,
        "smem": 40960,
    }
    assert px[FINISH_ALL_F32] == {"stack": 0, "spill_stores": 0, "spill_loads": 0, "regs": 70, "smem": 0}


@pytest.mark.parametrize(
    "opcode, bits",
    [
        ("LDG.E", 32),
        ("LDG.E.128", 128),
        ("LDG.E.128.CONSTANT", 128),
        ("LDG.E.LTC128B.128", 128),
        ("LDG.E.LTC128B", 32),  # an L2 prefetch hint, not a width
        ("LDG.E.64", 64),
        ("LDG.E.U16", 16),
        ("LDG.E.S8", 8),
        ("STG.E.128", 128),
        ("LDG.E.ENL2.256", 256),
    ],
)
def test_access_width(opcode, bits):
    assert sr.access_width(opcode) == bits


def test_parse_sass():
    c = sr.parse_sass(SASS)[REDUCE_NCHW_F32]
    assert c.ldg == {128: 2, 16: 1, 32: 2}
    assert c.stg == {64: 1, 128: 1}
    assert (c.ldl, c.stl) == (1, 1)
    assert (c.loop_ldl, c.loop_stl) == (1, 0)  # the reload is in the streaming loop, the store is not
    assert c.ldg_wide() == 2 and c.stg_wide() == 1
    assert (c.loop_instructions, c.loop_ldg) == (6, 3)  # 0x60..0x110
    assert c.instructions == 16


# ---- names, flags, the whole report ------------------------------------------------------------
def test_kernel_names():
    k = sr.kernel_name(REDUCE_NCHW_F32)
    assert (k.kind, k.short, k.dtype, k.streaming) == ("bn_pass_kernel", "reduce nchw f32", "f32", True)
    assert k.template == {"pass_": "reduce", "write": False, "channels_last": False, "per_sample": False}
    assert sr.kernel_name(EVAL_CL_BF16_DX_PS).short == "eval cl bf16 +dx +ps"
    k = sr.kernel_name(FINISH_ALL_F32)
    assert (k.kind, k.short, k.streaming) == ("finish_kernel", "finish[all] f32", False)
    assert sr.kernel_name(RECORD).short == "record f64"


def test_report_flags_and_table():
    res, sass, ptxas = sr.parse_res_usage(RES_USAGE), sr.parse_sass(SASS), sr.parse_ptxas(PTXAS)
    rows = {k.name: k for k in sr.build_report(res, sass, ptxas, sr.LIMITS["sm_90"], {})}
    r = rows["reduce nchw f32"]
    # ptxas' own smem (no reserve); 128-bit loads present; spills from ptxas
    assert (r.threads, r.smem, r.spill_stores, r.ldg128) == (512, 40960, 120, 2)
    assert r.occupancy["blocks"] == 2 and r.occupancy["percent"] == 50.0
    assert r.flags == ["spill"]
    # without ptxas output: cuobjdump's SHARED less the reserved 1 KB, the stack frame as spills
    e = rows["eval cl bf16 +dx +ps"]
    assert (e.smem, e.spill_stores) == (49152, None)
    assert e.flags == ["spill", "no-ldg128"]
    assert rows["finish[all] f32"].flags == ["occupancy"]  # 70 regs x 512 threads: 25%
    assert rows["finish[all] f32"].occupancy["percent"] == 25.0
    rec = rows["record f64"]
    assert (rec.threads, rec.occupancy["percent"], rec.flags) == (256, 50.0, [])  # 64 regs: 4 blocks
    table = sr.format_table(list(rows.values()))
    assert "reduce nchw f32" in table and "spill" in table


def test_threads_override():
    res = sr.parse_res_usage(RES_USAGE)
    rows = sr.build_report(res, {}, {}, sr.LIMITS["sm_90"], {"finish_kernel": 256})
    fin = next(k for k in rows if k.kind == "finish_kernel")
    assert fin.threads == 256 and fin.occupancy["percent"] == 37.5  # 70 regs: 7 warps x 4 / 8 = 3 blocks


# ---- the real thing ------------------------------------------------------------------------------
def _tools_missing() -> str | None:
    if shutil.which("nvcc") is None:
        return "nvcc not on PATH"
    for tool in ("cuobjdump", "nvdisasm"):
        if sr.find_tool(tool) is None:
            return f"{tool} not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
    return None


@pytest.mark.skipif(_tools_missing() is not None, reason=_tools_missing() or "")
def test_report_on_the_kernels(tmp_path, capsys):
    """Compiles csrc/cuda/*.cu for sm_90 (about a minute) and reads every kernel back."""
    out = tmp_path / "sass.json"
    assert sr.main(["--json", str(out)]) == 0
    data = json.loads(out.read_text())
    kernels = {k["name"]: k for k in data["kernels"]}
    # every instantiation: 4 passes' variants x 4 dtypes, 4 finishes x 2 acc types, record
    passes = [k for k in kernels.values() if k["kind"] == "bn_pass_kernel"]
    assert len(passes) == 72 and len(kernels) == 81
    assert "record f64" in kernels and "finish[dx] f32" in kernels
    for k in passes:
        assert k["threads"] == 512 and 0 < k["regs"] <= 64  # __launch_bounds__(512, 2)
        assert k["occupancy"]["blocks"] >= 2
        assert k["spill_stores"] is not None  # compiled here: ptxas -v was read
        assert sum(k["ldg"].values()) > 0
    assert kernels["grad_input nchw f32 +dx"]["stg"]  # it writes dx
    text = capsys.readouterr().out
    assert "reduce nchw f32" in text and "targets missed" in text
    if os.environ.get("GRADSTATS_SASS_CHECK") == "1":  # opt-in gate on the issue-10 targets
        assert sr.main(["--check"]) == 0
