"""Build script: the pure-Python package plus the compiled kernels ``lvr_engine._C``.

csrc/*.cpp (CPU kernels + the torch.library schema) always build. csrc/*.cu join them in a
CUDAExtension only when this torch has CUDA and nvcc is found; the CPU wheel used for
development has neither, so the same command builds a CPU-only ``_C`` there.
Build against the installed torch: ``pip install --no-build-isolation -e .``.
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    # Relative paths: setuptools refuses absolute source paths in editable builds.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


def _ext_modules():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # no torch at build time: ship the pure-Python package (ops fall back to torch)
        return [], {}
    cpp = _sources("*.cpp")
    cu = _sources("*.cu")
    # No -march=native: the binary must run on other CPUs; ops.cpp clones its hot loops per ISA instead.
    cxx = ["-O3", "-fopenmp", "-std=c++17"]
    nvcc_found = CUDA_HOME is not None or shutil.which("nvcc") is not None
    use_cuda = bool(cu) and torch.version.cuda is not None and nvcc_found
    if use_cuda:
        ext = CUDAExtension(
            "lvr_engine._C",
            cpp + cu,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=["-lgomp"],
        )
    else:
        ext = CppExtension("lvr_engine._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-lgomp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
