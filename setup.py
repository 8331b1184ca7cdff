"""Builds gradstats._C against the PyTorch already installed:

    pip install --no-build-isolation .

The CUDA kernels are compiled when this torch is a CUDA build and nvcc is found; otherwise, or
with GRADSTATS_CPU_ONLY=1, the extension is CPU-only. GRADSTATS_SANITIZE=1 builds the CPU code
with AddressSanitizer and UBSan (see scripts/sanitize.sh). TORCH_CUDA_ARCH_LIST picks GPU
architectures; with no GPU visible the default is a short list (8.0, 9.0 + PTX), not every one.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

try:
    import torch
except ImportError:
    sys.exit(
        "gradstats is a PyTorch extension and builds against the PyTorch already installed, "
        "but `import torch` failed.\nInstall PyTorch first (https://pytorch.org/get-started), then "
        "build without isolation so the build sees it:\n"
        "    pip install --no-build-isolation ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_home_from_nvcc() -> str | None:
    """Where the nvcc on PATH keeps its toolkit.

    torch guesses CUDA_HOME from nvcc's location, which is wrong when nvcc is a wrapper script
    (then -lcudart is not found at link time); nvcc itself reports its real TOP directory.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def _want_cuda() -> bool:
    if _truthy("GRADSTATS_CPU_ONLY") or _truthy("GRADSTATS_SANITIZE"):
        print("gradstats: building the CPU kernels only (GRADSTATS_CPU_ONLY or GRADSTATS_SANITIZE)")
        return False
    if torch.version.cuda is None:
        print("gradstats: this torch is not a CUDA build, building the CPU kernels only")
        return False
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        home = _cuda_home_from_nvcc()
        if home is None:
            print("gradstats: nvcc not found (set CUDA_HOME), building the CPU kernels only")
            return False
        os.environ["CUDA_HOME"] = home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    print(
        "gradstats: building the CUDA kernels "
        f"(CUDA_HOME={os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH')}, "
        f"archs={os.environ.get('TORCH_CUDA_ARCH_LIST', 'those of the visible GPUs')})"
    )
    return True


def _extensions():
    use_cuda = _want_cuda()
    # Imported only now: torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is a header template that parallelises through OpenMP when
    # torch is built with it (as its Linux wheels are); without the flag it silently runs serial.
    # -Wno-psabi: 64-byte vector types in always-inlined kernel helpers (csrc/cpu/vec.h).
    cxx = ["-O3"]
    link = []
    if _truthy("GRADSTATS_SANITIZE"):
        # AddressSanitizer + UndefinedBehaviorSanitizer build of the CPU code (scripts/sanitize.sh).
        cxx = [
            "-O1",
            "-g",
            "-fno-omit-frame-pointer",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=undefined",
        ]
        link = ["-fsanitize=address,undefined"]
    cxx.append("-Wno-psabi")
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "gradstats._C",
            sources,
            py_limited_api=True,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    else:
        ext = CppExtension(
            "gradstats._C",
            sources,
            py_limited_api=True,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["gradstats", "gradstats.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
