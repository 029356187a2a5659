"""Build of the `sdclr_fast._C` extension (pruning ops registered with TORCH_LIBRARY).

The CPU implementation is always built; the CUDA one only where torch was built with
CUDA and a CUDA toolkit is found (set SDCLR_FAST_NO_CUDA=1 to skip it).
"""
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _extension():
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("SDCLR_FAST_NO_CUDA", "0") != "1"
    )
    sources = ["csrc/prune.cpp"]
    if with_cuda:
        return CUDAExtension(
            "sdclr_fast._C",
            sources + ["csrc/prune_cuda.cu"],
            define_macros=[("SDCLR_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "sdclr_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
    )


setup(
    packages=find_packages(include=["sdclr_fast", "sdclr_fast.*"]) + ["sdclr_fast.kernels"],
    package_dir={"sdclr_fast.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
