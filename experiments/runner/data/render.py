"""Deterministic rendering of scikit-learn's bundled 8x8 digits into visual domains.

Everything here is pure NumPy/SciPy on one image at a time and depends only on the
inputs and the `numpy.random.Generator` passed in, so a dataset rendered twice with the
same seed is byte-identical.

Domains (a small DomainNet: same ten classes, different visual styles):
  source    grey digit, random contrast/brightness  (pretraining only)
  inverted  dark digit on a light background
  colour    saturated digit colour on a dark background of another hue
  noisy     grey digit under heavy Gaussian pixel noise
  rotated   digit rotated by 35-55 degrees
  sketch    dark outline (edge magnitude) on white, like DomainNet's sketch
  thick     dilated, blurred strokes
"""

from __future__ import annotations

import colorsys

import numpy as np
from scipy import ndimage

SOURCE_DOMAIN = "source"
FEDERATED_DOMAINS = ("inverted", "colour", "noisy", "rotated", "sketch", "thick")
ALL_DOMAINS = (SOURCE_DOMAIN,) + FEDERATED_DOMAINS


def _affine_jitter(img: np.ndarray, rng: np.random.Generator, angle_deg: float) -> np.ndarray:
  """Rotates by `angle_deg`, scales by U[0.9, 1.1] and shifts by up to res/16 pixels.

  Args:
    img: [res, res] float image in [0, 1].
  Returns:
    [res, res] float image in [0, 1].
  """
  res = img.shape[0]
  theta = np.deg2rad(angle_deg)
  scale = rng.uniform(0.9, 1.1)
  shift = rng.uniform(-res / 16, res / 16, size=2)
  rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) / scale
  centre = (res - 1) / 2.0
  offset = centre - rot @ (centre + shift)
  return np.clip(ndimage.affine_transform(img, rot, offset=offset, order=1, mode="constant"), 0, 1)


def _random_hue_rgb(rng: np.random.Generator, value: float) -> np.ndarray:
  return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.7, 1.0), value))


def render_digit(digit8: np.ndarray, domain: str, res: int, rng: np.random.Generator) -> np.ndarray:
  """Renders one 8x8 scikit-learn digit (values 0..16) in a visual domain.

  Args:
    digit8: [8, 8] array with values in [0, 16].
    domain: one of `ALL_DOMAINS`.
    res: output side length in pixels (a multiple of 8 is sharpest).
    rng: source of the per-example jitter.
  Returns:
    [res, res, 3] uint8 RGB image.
  """
  if domain not in ALL_DOMAINS:
    raise ValueError(f"unknown domain {domain!r}; allowed: {ALL_DOMAINS}")
  img = ndimage.zoom(digit8.astype(np.float64) / 16.0, res / 8.0, order=1)
  angle = rng.uniform(35, 55) * rng.choice([-1, 1]) if domain == "rotated" else rng.uniform(-10, 10)
  img = _affine_jitter(img, rng, angle)
  if domain == "source":
    grey = rng.uniform(0.0, 0.2) + rng.uniform(0.6, 0.8) * img
    rgb = np.repeat(grey[..., None], 3, axis=-1)
  elif domain == "inverted":
    rgb = np.repeat((1.0 - 0.9 * img)[..., None], 3, axis=-1)
  elif domain == "colour":
    fg, bg = _random_hue_rgb(rng, 1.0), _random_hue_rgb(rng, 0.35)
    rgb = bg * (1.0 - img[..., None]) + fg * img[..., None]
  elif domain == "noisy":
    grey = img + rng.normal(0.0, 0.3, size=img.shape)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
  elif domain == "rotated":
    rgb = np.repeat(img[..., None], 3, axis=-1)
  elif domain == "sketch":
    edges = np.hypot(ndimage.sobel(img, axis=0), ndimage.sobel(img, axis=1))
    edges = edges / max(edges.max(), 1e-6)
    rgb = np.repeat((1.0 - edges)[..., None], 3, axis=-1)
  else:  # thick
    thick = ndimage.gaussian_filter(ndimage.grey_dilation(img, size=(3, 3)), sigma=0.8)
    rgb = np.repeat(thick[..., None], 3, axis=-1)
  return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)
