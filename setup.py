"""Build script for the `vllm` package.

The package is pure Python. When the build environment can import a CUDA
build of torch and finds nvcc, the CUDA/C++ kernels in csrc/ are compiled
into the extension module `vllm._C` as well. pip's default build isolation
hides the installed torch, so GPU users install with

    pip install --no-build-isolation -e .

Environment variables:
    VLLM_TARGET_DEVICE=cpu   never build the extension.
    TORCH_CUDA_ARCH_LIST     GPU architectures to compile for
                             (default "8.0;8.6;8.9;9.0": sm_80 ... sm_90;
                             "9.0" alone builds about four times faster).
    MAX_JOBS                 parallel compile jobs (torch's; with ninja).
    NVCC_THREADS             architectures nvcc compiles in parallel within
                             one source file (default 4).
"""
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0"


def read_requirements(name: str) -> list[str]:
    """Requirement lines of a requirements file, without comments or -r."""
    requirements = []
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            requirements.append(line)
    return requirements


def _skip(reason: str) -> tuple[list, dict]:
    print(f"vllm setup.py: not building vllm._C: {reason}", file=sys.stderr)
    return [], {}


def cuda_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for vllm._C, or ([], {}) when it is skipped."""
    if os.environ.get("VLLM_TARGET_DEVICE", "").lower() == "cpu":
        return _skip("VLLM_TARGET_DEVICE=cpu")
    sources = sorted(
        str(path.relative_to(ROOT)) for pattern in ("*.cu", "*.cpp")
        for path in (ROOT / "csrc").rglob(pattern))
    if not sources:
        return _skip("no csrc/**/*.cu or csrc/**/*.cpp sources")
    try:
        import torch
        from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension,
                                               CUDAExtension)
    except ImportError:
        return _skip("torch cannot be imported here (build isolation? "
                     "use pip install --no-build-isolation)")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return _skip("nvcc not found (set CUDA_HOME)")

    # torch turns this into one -gencode flag per architecture.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    print(
        f"vllm setup.py: building vllm._C from {len(sources)} sources for "
        f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}",
        file=sys.stderr)
    extension = CUDAExtension(
        name="vllm._C",
        sources=sources,
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": [
                "-O3", "--use_fast_math", "--threads",
                os.environ.get("NVCC_THREADS", "4")
            ],
        },
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()

setup(
    name="vllm",
    version="0.1.0",
    description=("A from-scratch, vLLM-compatible LLM inference engine in "
                 "Python and PyTorch"),
    python_requires=">=3.10",
    packages=find_packages(include=["vllm", "vllm.*"]),
    install_requires=read_requirements("requirements.txt"),
    entry_points={
        "console_scripts": ["vllm = vllm.entrypoints.cli.main:main"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
