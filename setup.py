"""Build script: the pure-Python package always; the host extension `distattn._emulate` (the
CUDA kernels compiled for the CPU CTA emulator, backend "emulate") whenever torch is importable;
the CUDA extension `distattn._C` when the installed torch has CUDA and nvcc is found.

Environment:
  DISTATTN_CUDA_ARCHS     e.g. "90a;80" (default) -- which SM architectures to compile for
  DISTATTN_NO_CUDA=1      skip the CUDA extension even where it could be built
  DISTATTN_NO_EMULATE=1   skip the emulator extension
"""
import glob
import os
import sys

from setuptools import setup


def _cuda_extension():
    """Return ([ext], cmdclass) or ([], {}) with the reason printed once."""
    if os.environ.get("DISTATTN_NO_CUDA") == "1":
        print("distattn: DISTATTN_NO_CUDA=1, building without the cuda backend", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("distattn: torch is not importable at build time (use --no-build-isolation); "
              "building without the cuda backend", file=sys.stderr)
        return [], {}
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        print("distattn: torch has no CUDA (or nvcc is missing); the 'cuda' backend is absent, "
              "'torch' and 'reference' backends are available", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True)) + ["csrc/binding.cpp"]
    if not os.path.exists("csrc/binding.cpp"):
        print("distattn: csrc/binding.cpp not found; building without the cuda backend",
              file=sys.stderr)
        return [], {}
    archs = os.environ.get("DISTATTN_CUDA_ARCHS", "90a;80").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    include_dirs = [os.path.abspath("csrc")]
    try:
        import cutlass_library
    except ImportError:
        print("distattn: the CUTLASS/CuTe headers are missing (pip install nvidia-cutlass); "
              "building without the cuda backend", file=sys.stderr)
        return [], {}
    include_dirs.append(os.path.join(os.path.dirname(cutlass_library.__file__),
                                     "source", "include"))
    ext = cpp_extension.CUDAExtension(
        name="distattn._C",
        sources=sources,
        include_dirs=include_dirs,
        # No -std flag: torch's extension machinery picks the C++ standard its headers need
        # (the kernels themselves need C++17 or later).
        extra_compile_args={
            # The binding reports the architectures (distattn._C.archs()) so that the backend
            # can refuse a GPU this build has no code for.
            "cxx": ["-O3", "-DDISTATTN_CUDA_ARCHS_CSV=" + ",".join(a for a in archs if a)],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "--use_fast_math", "-lineinfo",
                     "-DNDEBUG"] + gencode,
        },
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


def _emulate_extension():
    """Return ([ext], cmdclass) for distattn._emulate, or ([], {}) with the reason printed.

    A plain C++ build (g++/clang++, no CUDA): the kernel translation units of csrc/kernels,
    included by csrc/emulate/*.cpp and compiled with DISTATTN_EMULATE, the emulator runtime and
    csrc/binding.cpp. Takes about a minute on two cores, most of it the torch binding."""
    if os.environ.get("DISTATTN_NO_EMULATE") == "1":
        print("distattn: DISTATTN_NO_EMULATE=1, building without the emulate backend",
              file=sys.stderr)
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("distattn: torch is not importable at build time (use --no-build-isolation); "
              "building without the emulate backend", file=sys.stderr)
        return [], {}
    ext = cpp_extension.CppExtension(
        name="distattn._emulate",
        sources=sorted(glob.glob("csrc/emulate/*.cpp")),
        include_dirs=[os.path.abspath("csrc")],
        define_macros=[("DISTATTN_EMULATE", "1")],
        # The kernels pun float/half storage through uint32_t and float2 as CUDA code does.
        # -g0: no debug info (Python's flags add -g), which took the torch binding's TU from
        # 34 to 55 s to compile on 2 cores.
        extra_compile_args=["-O2", "-g0", "-fno-strict-aliasing", "-Wno-unknown-pragmas"],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = [], {}
for _exts, _cmds in (_emulate_extension(), _cuda_extension()):
    ext_modules += _exts
    cmdclass.update(_cmds)
setup(ext_modules=ext_modules, cmdclass=cmdclass)
