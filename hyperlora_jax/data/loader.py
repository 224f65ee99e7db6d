"""Loads a TFDS image dataset into memory as NumPy arrays, without TensorFlow or a network.

`name` is a TFDS name (`digits_domains/res16`, `cifar100`, `domainnet/real`, ...) or several
joined by `+` (`domainnet/real+domainnet/sketch`), each then becoming one domain. The
embedded `digits_domains` is generated on first use; any other dataset must already be
prepared in `data_dir` in the array_record format (`tfds build NAME --file_format=array_record`
on a machine with a network), since nothing is downloaded here.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from hyperlora_jax.data import digits_domains

EMBEDDED_NAME = "digits_domains"
DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "hyperlora_jax", "tensorflow_datasets")


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """A split held in memory.

  Attributes:
    images: [N, H, W, 3] uint8.
    labels: [N] int32 class ids.
    domains: [N] int32 domain ids.
    num_classes: number of classes.
    domain_names: name of each domain id.
    class_names: name of each class id (for text prompts).
  """
  images: np.ndarray
  labels: np.ndarray
  domains: np.ndarray
  num_classes: int
  domain_names: tuple[str, ...]
  class_names: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.labels)

  def subset(self, indices: np.ndarray) -> "ImageDataset":
    return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices],
                               domains=self.domains[indices])


def _builder(name: str, data_dir: str):
  if name.split("/")[0] == EMBEDDED_NAME:
    config = name.split("/")[1] if "/" in name else None
    builder = digits_domains.DigitsDomains(config=config, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      builder.download_and_prepare()
    return builder
  return tfds.builder(name, data_dir=data_dir)


def prepare_dataset(name: str, data_dir: str | None = None) -> None:
  """Generates the embedded dataset(s) in `name` if not yet there (real datasets must already
  be prepared); e.g. once before several processes read it."""
  for source in name.split("+"):
    _builder(source, data_dir or DEFAULT_DATA_DIR)


def _data_source(builder, name: str, split: str, data_dir: str):
  """Random-access records of a prepared split (array_record), with a clear error otherwise."""
  try:
    return builder.as_data_source(split=split)
  except (NotImplementedError, FileNotFoundError, AssertionError, ValueError) as e:
    raise FileNotFoundError(
        f"data.name: TFDS dataset {name!r} split {split!r} is not prepared as array_record in "
        f"data_dir={data_dir!r} ({type(e).__name__}). Nothing can be downloaded at run time: "
        f"prepare it on a machine with a network with `tfds build {name} "
        f"--file_format=array_record --data_dir=DIR` and pass that DIR as data.data_dir.") from e


def _to_rgb(image: np.ndarray, image_size: int | None) -> np.ndarray:
  """[H, W, C] uint8 (C in {1, 3}) -> [S, S, 3] uint8, resizing only if `image_size` differs."""
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image_size is not None and image.shape[:2] != (image_size, image_size):
    from PIL import Image  # pillow ships with matplotlib; only real datasets need it.
    image = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BILINEAR))
  return image


def _read_all(source) -> list[dict]:
  """Every record of a TFDS data source."""
  return [source[i] for i in range(len(source))]


def load_image_dataset(name: str, split: str, data_dir: str | None = None,
                       image_size: int | None = None) -> ImageDataset:
  """Reads a whole split into memory.

  Args:
    name: TFDS name, or several joined by `+` (each one domain).
    split: TFDS split, e.g. `train`, `test`, `pretrain`, `train[:10%]`.
    data_dir: TFDS data directory (default: `~/.cache/hyperlora_jax/tensorflow_datasets`).
    image_size: resize every image to [image_size, image_size] (None keeps stored sizes,
      which must then agree).
  Returns:
    The split as an `ImageDataset`.
  """
  data_dir = data_dir or DEFAULT_DATA_DIR
  names = name.split("+")
  parts, num_classes, domain_names = [], None, []
  for source_index, source in enumerate(names):
    builder = _builder(source, data_dir)
    features = builder.info.features
    if "label" not in features:
      raise ValueError(f"data.name: dataset {source!r} has no 'label' feature (has {list(features)})")
    source_classes = features["label"].num_classes
    if num_classes not in (None, source_classes):
      raise ValueError(f"data.name: {source!r} has {source_classes} classes, the others {num_classes}")
    num_classes = source_classes
    class_names = tuple(features["label"].names)
    records = _read_all(_data_source(builder, source, split, data_dir))
    images = np.stack([_to_rgb(np.asarray(r["image"]), image_size) for r in records])
    labels = np.array([r["label"] for r in records], np.int32)
    if "domain" in features and len(names) == 1:
      domains = np.array([r["domain"] for r in records], np.int32)
      domain_names = list(features["domain"].names)
    else:
      domains = np.full(len(labels), source_index, np.int32)
      domain_names.append(source)
    parts.append((images, labels, domains))
  return ImageDataset(images=np.concatenate([p[0] for p in parts]),
                      labels=np.concatenate([p[1] for p in parts]),
                      domains=np.concatenate([p[2] for p in parts]),
                      num_classes=int(num_classes), domain_names=tuple(domain_names),
                      class_names=class_names)
