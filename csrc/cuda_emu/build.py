"""Builds the emulated CUDA kernels (gradstats_cuda_emu) from this checkout's csrc/ into a cache
folder keyed by a hash of the sources and the build settings, and prints that folder (the one to
put on PYTHONPATH). Used by scripts/cuda_emulator.sh.

    python csrc/cuda_emu/build.py CACHE_ROOT [--sanitize]

The kernel files (csrc/cuda/*.cu) are compiled unchanged by the host compiler, with
GRADSTATS_CUDA_EMU defined (csrc/cuda/emulatable.h then takes the emulator's built-ins), through
one-line .cpp files that include them. __half and __nv_bfloat16 come from the CUDA headers.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.dirname(HERE)


def cuda_include() -> str:
    """A folder with cuda_fp16.h: CUDA_HOME's, the nvcc toolkit's, or the CUDA runtime wheel
    that a CUDA build of torch depends on."""
    candidates = [
        os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)
    ]
    nvcc = shutil.which("nvcc")
    if nvcc:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cu")
            open(src, "w").close()
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "p.o")], capture_output=True, text=True
            )
            top = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
            if top:
                candidates.append(os.path.join(top.group(1).strip(), "include"))
    try:
        import nvidia

        for root in nvidia.__path__:
            candidates += glob.glob(os.path.join(root, "*", "include"))
            candidates += glob.glob(os.path.join(root, "cuda_runtime", "include"))
    except ImportError:
        pass
    for inc in candidates:
        if os.path.exists(os.path.join(inc, "cuda_fp16.h")):
            return inc
    sys.exit("cuda_emulator: no CUDA headers (cuda_fp16.h) found: set CUDA_HOME or put nvcc on PATH")


def sources() -> list[str]:
    files = []
    for pattern in ("*.h", "*.cpp", "cuda/*", "cuda_emu/*"):
        files += glob.glob(os.path.join(CSRC, pattern))
    return sorted(f for f in files if os.path.isfile(f) and not f.endswith(".pyc"))


def main() -> None:
    cache_root = sys.argv[1]
    sanitize = "--sanitize" in sys.argv[2:]
    import torch

    include = cuda_include()
    flags = ["-O2", "-DGRADSTATS_CUDA_EMU", f"-I{include}", "-Wno-unknown-pragmas"]
    ldflags = []
    if sanitize:
        flags = [
            "-O1",
            "-g",
            "-DGRADSTATS_CUDA_EMU",
            f"-I{include}",
            "-Wno-unknown-pragmas",
            "-fsanitize=address",
            "-fno-omit-frame-pointer",
        ]
        ldflags = ["-fsanitize=address"]
    h = hashlib.sha256()
    for f in sources():
        h.update(os.path.relpath(f, CSRC).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    h.update(" ".join(flags + [torch.__version__, sys.version]).encode())
    variant = "asan" if sanitize else "plain"
    out = os.path.join(cache_root, variant + "-" + h.hexdigest()[:16])
    if not os.path.exists(os.path.join(out, "done")):
        # One ninja folder per variant: a change recompiles only the files it touches.
        objects = os.path.join(cache_root, "ninja-" + variant)
        os.makedirs(objects, exist_ok=True)
        wrappers = []
        for cu in sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))):
            w = os.path.join(objects, os.path.basename(cu)[:-3] + "_emu.cpp")
            with open(w, "w") as fh:
                fh.write(f'#include "{cu}"\n')
            wrappers.append(w)
        from torch.utils.cpp_extension import load

        with open(os.path.join(cache_root, "build.log"), "w") as log:
            stdout = os.dup(1)
            os.dup2(log.fileno(), 1)  # keep the compiler's chatter out of the caller's output
            try:
                load(
                    name="_gradstats_cuda_emu",
                    sources=[
                        os.path.join(HERE, "module.cpp"),
                        os.path.join(HERE, "emulator.cpp"),
                        os.path.join(HERE, "faulty_kernels.cpp"),
                        os.path.join(CSRC, "ops_prepare.cpp"),
                    ]
                    + wrappers,
                    extra_cflags=flags,
                    extra_ldflags=ldflags,
                    build_directory=objects,
                    with_cuda=False,
                    verbose=True,
                )
            finally:
                os.dup2(stdout, 1)
        os.makedirs(out, exist_ok=True)
        shutil.copy(glob.glob(os.path.join(objects, "_gradstats_cuda_emu*.so"))[0], out)
        shutil.copy(os.path.join(HERE, "gradstats_cuda_emu.py"), out)
        open(os.path.join(out, "done"), "w").close()
    print(out)


if __name__ == "__main__":
    main()
