"""sleep_jax: a JAX/TPU-native framework that gives language models a sleep phase."""
from setuptools import find_packages, setup

setup(
    name="sleep_jax",
    version="0.1.0",
    description="Knowledge Seeding and Dreaming for language models in JAX (arXiv 2606.03979).",
    packages=find_packages(include=["sleep_jax", "sleep_jax.*"]),
    python_requires=">=3.10",
    # Compatible ranges so a newer accelerator image (jax 0.11, flax 0.12.10) still installs; the
    # exact versions tested here are in constraints.txt, which the Makefile uses.
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.14",
        "optax>=0.2.8,<0.4",
        "orbax-checkpoint>=0.12.4,<0.14",
        "grain>=0.2.18,<0.3",
        "tensorflow-datasets>=4.9.10,<5",
        "ml-collections>=1.1.0,<2",
        "numpy>=1.26",
        "tokenizers>=0.21,<1",
        "safetensors>=0.5,<1",
        "gguf>=0.19,<1",
        "tensorboardX>=2.6,<3",
        "rapidfuzz>=3.10,<4",
        "matplotlib>=3.9,<4",
        "tqdm>=4.66,<5",
        "absl-py>=2.1,<3",
        "jinja2>=3.1",  # chat templates (sleep-jax generate --chat)
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.8,<4", "ruff>=0.6"],
        "hf": ["torch==2.13.0", "transformers>=4.56,<6", "accelerate>=1.10,<2"],
        # `sleep-jax plan`: compiles for TPU topologies on a CPU host (the libtpu jax pins)
        "plan": ["libtpu==0.0.42.*"],
    },
    entry_points={"console_scripts": ["sleep-jax=sleep_jax.cli:main"]},
)
