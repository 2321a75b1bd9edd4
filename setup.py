"""fastclip: the package (fastclip/), its Triton kernels (kernels/ -> fastclip.kernels) and C++ ops (csrc/)."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def extensions():
    """fastclip._C from csrc/*.cpp (and its headers, csrc/*.h), when there are sources; built against the installed
    torch."""
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    headers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.h"))
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension(
        "fastclip._C",
        sources,
        depends=headers,  # a changed header rebuilds the sources (setuptools compares times with these too)
        extra_compile_args={"cxx": ["-O3", "-fopenmp", "-march=native"]},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = extensions()

setup(
    name="fastclip",
    version="0.1.0",
    description="CLIP pretraining for throughput: DALI, DeepSpeed ZeRO, a fused contrastive loss",
    python_requires=">=3.10",
    packages=["fastclip", "fastclip.data", "fastclip.kernels"],
    package_dir={"fastclip.kernels": "kernels"},
    package_data={"fastclip": ["model_configs/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.11",
        "open_clip_torch>=3.0",
        "deepspeed>=0.16",
        "pyyaml",
        "braceexpand",
        "tqdm",
        "packaging",
    ],
)
