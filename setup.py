from setuptools import find_packages, setup

setup(
  name="hyperlora_jax",
  version="0.2.0",
  description="Federated LoRA fine-tuning of foundation models in JAX/Flax, built around HyperLoRA.",
  python_requires=">=3.11",
  packages=find_packages(
    include=["hyperlora_jax", "hyperlora_jax.*", "experiments", "experiments.*", "configs", "benchmarks"]
  ),
  package_data={"hyperlora_jax": ["plan_targets/*.txtpb"]},  # XLA's GPU target configs for `plan`.
  install_requires=[
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "tensorflow-datasets>=4.9.10",
    "array-record>=0.8",
    "importlib_resources",
    "etils",
    "ml-collections>=1.1",
    "absl-py",
    "numpy>=2",
    "scipy",
    "scikit-learn>=1.5",
    "matplotlib",
    "pillow",
    "tqdm",
    "safetensors>=0.4",
    "tokenizers>=0.20",
    "sentencepiece>=0.2",  # Reads a checkpoint's tokenizer.model (Gemma's own release) where it has no tokenizer.json.
    "jinja2>=3.1",
    "pyarrow",
    "dp-accounting>=0.4",
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow (experiments/runner/tensorboard.py).
  ],
  extras_require={
    "test": ["pytest>=8", "pytest-xdist>=3.5", "chex>=0.1.90", "ruff>=0.6", "mypy>=1.10"],
    "bench": ["torch>=2.4", "transformers>=4.57", "peft>=0.17"],
    "tpu-plan": ["jax[tpu]"],
    "gpu-plan": ["jax-cuda12-plugin==0.10.2", "jax-cuda12-pjrt==0.10.2"],  # jax's own version.
  },  # bench: the optional PyTorch rows of `make bench`; tpu-plan / gpu-plan: compilers for `experiments.plan`.
)
