"""Test-time feature shift: image corruptions at graded severities.

The corruptions and their severity levels follow the common-corruption benchmarks of Hendrycks
& Dietterich (ICLR 2019, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations"; the CIFAR-10-C / ImageNet-C code): severity 0 leaves the images as they are,
1 to 5 shift them more and more. They move the test inputs away from the clients' training
distribution while keeping the labels, so a model's accuracy as a function of severity measures
its robustness to feature shift.

  gaussian_noise   x + N(0, σ²) on [0, 1] pixels, clipped; σ from ImageNet-C (a wider range
                   than CIFAR-10-C's, whose weakest levels barely move 16-pixel digits)
  contrast         (x - mean) · c + mean per image, clipped; c from CIFAR-10-C

Pure numpy, on the uint8 images the data pipeline holds ([..., H, W, 3]); the noise is drawn
from `seed` alone, so every model evaluated at a severity sees the same corrupted images.
"""

from __future__ import annotations

import numpy as np

SEVERITY_LEVELS = 5
# Severity k (1..5) -> the corruption's parameter.
GAUSSIAN_NOISE_SIGMA = (0.08, 0.12, 0.18, 0.26, 0.38)
CONTRAST_FACTOR = (0.75, 0.5, 0.4, 0.3, 0.15)
KINDS = ("gaussian_noise", "contrast")


def gaussian_noise(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
  """images [..., H, W, 3] uint8 -> the same plus N(0, sigma²) on the [0, 1] scale, clipped and
  rounded back to uint8."""
  noise = np.random.default_rng(seed).normal(0.0, sigma, images.shape)
  return _to_uint8(images / 255.0 + noise)


def contrast(images: np.ndarray, factor: float) -> np.ndarray:
  """images [..., H, W, 3] uint8 -> (x - m) · factor + m with m each image's mean over its
  pixels and channels (factor 1: unchanged, 0: a flat grey of the image's mean)."""
  x = images / 255.0
  mean = x.mean(axis=(-3, -2, -1), keepdims=True)
  return _to_uint8((x - mean) * factor + mean)


def corrupt(images: np.ndarray, kind: str, severity: int, seed: int = 0) -> np.ndarray:
  """images [..., H, W, 3] uint8 corrupted by `kind` (one of `KINDS`) at `severity` (0 = the
  images unchanged, 1..`SEVERITY_LEVELS`); uint8, same shape.

  Raises:
    ValueError: an unknown kind or a severity outside 0..SEVERITY_LEVELS.
  """
  if kind not in KINDS:
    raise ValueError(f"corruption kind {kind!r}: expected one of {KINDS}")
  if not 0 <= severity <= SEVERITY_LEVELS:
    raise ValueError(f"corruption severity {severity}: expected 0..{SEVERITY_LEVELS}")
  if images.dtype != np.uint8:
    raise ValueError(f"corruption of images of dtype {images.dtype}: expected uint8 [..., H, W, 3]")
  if severity == 0:
    return images
  if kind == "gaussian_noise":
    return gaussian_noise(images, GAUSSIAN_NOISE_SIGMA[severity - 1], seed)
  return contrast(images, CONTRAST_FACTOR[severity - 1])


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
