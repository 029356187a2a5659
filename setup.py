"""Build of the `sdclr_fast._C` extension (pruning ops registered with TORCH_LIBRARY).

The CPU implementation is always built; the CUDA one only where torch was built with
CUDA and a CUDA toolkit is found (set SDCLR_FAST_NO_CUDA=1 to skip it).
"""
import os
import sys

try:
    import torch
except ImportError:
    # pyproject.toml lists no torch among the build requirements on purpose: an isolated build
    # would compile against a torch of its own, and the extension would not load with yours.
    sys.exit("sdclr-fast compiles its C++ extension against the torch of the environment it is "
             "installed into: install torch there first, then run `pip install "
             "--no-build-isolation <sdclr-fast source>`")
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


# The shared libstdc++ named before the compiler's own runtime libraries, so that a static one
# that a toolchain or Python build may add (see _BuildExt) is never pulled in.
_LINK = ["-fopenmp"] + (["-lstdc++"] if sys.platform.startswith("linux") else [])


def _extension():
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
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
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=_LINK,
        )
    return CppExtension(
        "sdclr_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=_LINK
    )


class _BuildExt(BuildExtension):
    """Links libstdc++ dynamically, whatever the Python build asks for. Some Python builds carry
    -static-libstdc++ in their link flags; the extension then holds a second libstdc++ beside
    the one torch loaded, and its first formatted error message (an int streamed into a
    TORCH_CHECK) crashes in std::codecvt instead of raising (seen on a CUDA machine)."""

    def build_extensions(self):
        for attr in ("linker_so", "linker_so_cxx", "linker_exe", "linker_exe_cxx"):
            cmd = getattr(self.compiler, attr, None)
            if isinstance(cmd, list):
                setattr(self.compiler, attr, [a for a in cmd if a != "-static-libstdc++"])
        super().build_extensions()


setup(
    packages=find_packages(include=["sdclr_fast", "sdclr_fast.*"]) + ["sdclr_fast.kernels"],
    package_dir={"sdclr_fast.kernels": "kernels"},
    package_data={"sdclr_fast.kernels": ["*.json"]},  # the masked-conv tuned-config table
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExt.with_options(use_ninja=True)},
)
