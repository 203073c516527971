"""blip2_jax: BLIP-2 in JAX/Flax, TPU-first."""
from setuptools import find_packages, setup

setup(
    name="blip2_jax",
    version="0.1.0",
    description="BLIP-2 (Li et al., ICML 2023) in JAX/Flax: inference, pre-training and fine-tuning on TPU/GPU/CPU.",
    packages=find_packages(include=["blip2_jax", "blip2_jax.*"]),
    python_requires=">=3.12",
    install_requires=[
        "jax>=0.8",
        "flax>=0.12",
        "qwix>=0.1.8",  # frozen-tower quantization (blip2_jax/quant.py)
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "transformers>=5.0",
        "huggingface_hub",
        "tokenizers",
        "sentencepiece",
        "tensorflow-datasets>=4.9.8",
        "grain>=0.2.12",
        "array-record",
        "ml-collections>=1.0",
        "absl-py",
        "safetensors",
        "pillow",
        "numpy",
        "tensorboardX",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "scikit-image", "nbclient", "ipykernel", "nbformat"],
        "eval": ["pycocoevalcap", "lemminflect"],
        "tpu": ["jax[tpu]", "gcsfs"],
        "demo": ["gradio>=6", "playwright", "pyarrow"],  # web demo, its browser test, Parquet output
        "beam": ["apache-beam>=2.70", "pyarrow"],  # Beam builds of web pairs, CapFilt on Beam
    },
)
