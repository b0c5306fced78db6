from setuptools import find_packages, setup

setup(
    name="fusedformers",
    # keep below 0.16: transformers 5 treats an installed top-level `kernels` package whose distribution
    # version falls in 0.16-0.19 as HF's own `kernels` package
    version="0.1.0",
    description="Triton kernels for BART/LLaMA attention and RMSNorm, and drop-in HF-compatible models",
    packages=find_packages(include=["kernels", "kernels.*", "models", "models.*", "bench", "bench.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0", "safetensors>=0.4"],
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-xdist", "transformers>=5.0,<6"],
                    "bench": ["matplotlib"]},
)
