"""Builds the C++ extension ``dcnv2._C`` (CPU kernels registered with TORCH_LIBRARY)."""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

csrc = os.path.join("src", "dcnv2", "ops", "csrc")
sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))



def simd_flags():
    """AVX2/FMA lets the compiler vectorise the per-channel bilinear loops; only when the CPU has them."""
    if os.environ.get("DCNV2_PORTABLE") or os.uname().machine != "x86_64":
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if (" avx2" in flags and " fma" in flags) else []


setup(
    ext_modules=[
        CppExtension(
            "dcnv2._C",
            sources,
            extra_compile_args=["-O3", "-fopenmp"] + simd_flags(),
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
