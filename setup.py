"""fusedformers: the checkout's top-level folders install as one namespace.

``kernels/``, ``models/`` and ``bench/`` become ``fusedformers.kernels``, ``fusedformers.models`` and
``fusedformers.bench`` (``fusedformers`` is a PEP 420 namespace package: it has no ``__init__.py``), so nothing
is installed under a bare ``kernels`` or ``models`` that another project (HF's ``kernels`` package, a user's own
``models/``) could collide with.
"""
from setuptools import setup

FOLDERS = {"kernels": "fusedformers.kernels", "models": "fusedformers.models", "bench": "fusedformers.bench"}

setup(
    name="fusedformers",
    version="0.1.0",
    description="Triton kernels for BART/LLaMA attention and RMSNorm, and drop-in HF-compatible models",
    packages=list(FOLDERS.values()),
    package_dir={package: folder for folder, package in FOLDERS.items()},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0", "safetensors>=0.4"],
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-xdist", "transformers>=5.0,<6", "ruff"],
                    "bench": ["matplotlib"]},
)
