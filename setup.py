"""pixelbert_jax: Pixel-BERT in JAX/Flax for TPU and GPU.

Version ranges are deliberately wide so that an accelerator host's newer jax works; CI pins exact versions
with `constraints.txt`.
"""

from setuptools import find_packages, setup

setup(
    name="pixelbert_jax",
    version="0.1.0",
    description="Pixel-BERT (pixel-text alignment) in JAX/Flax: pre-training, fine-tuning, PyTorch export",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["pixelbert_jax", "pixelbert_jax.*"]),
    install_requires=[
        "jax>=0.10.0",
        "flax>=0.10.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "tensorflow-datasets>=4.9.8",
        "array-record>=0.7.0",
        "grain>=0.2.10",
        "transformers>=4.48",
        "tokenizers>=0.20",
        "ml-collections>=1.0.0",
        "numpy>=1.26",
        "pillow>=10.0",
        "absl-py>=2.0",
        "tensorboardX>=2.6",
        "safetensors>=0.4",
        "etils",
    ],
    extras_require={
        "tpu": ["jax[tpu]>=0.10.0"],
        "cuda": ["jax[cuda12]>=0.10.0"],
        "torch": ["torch>=2.9", "torchvision>=0.24"],
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "pyink>=24.10"],
    },
)
