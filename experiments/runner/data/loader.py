"""Loads a TFDS image dataset, without TensorFlow or a network: into memory, or streamed.

In memory (`stream=False`), a split's images are one [N, H, W, 3] uint8 array. Streamed
(`stream=True`), they are a `RecordImages`: random access into the prepared array_record
files, `images[indices]` reading and decoding just those records, so host memory holds the
labels and domains (the index) and whatever blocks are being built, not the split.

`name` is a TFDS name (`digits_domains/res16`, `cifar100`, `domainnet/real`, ...) or several
joined by `+` (`domainnet/real+domainnet/sketch`), each then becoming one domain. The
embedded `digits_domains` is generated on first use; any other dataset must already be
prepared in `data_dir` in the array_record format (`tfds build NAME --file_format=array_record`
on a machine with a network), since nothing is downloaded here.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import tensorflow_datasets as tfds

from experiments.runner.data import digits_domains
from hyperlora_jax import files

EMBEDDED_NAME = "digits_domains"
DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "hyperlora_jax", "tensorflow_datasets")


class RecordImages:
  """The images of one or more prepared splits, read on demand (array-like, uint8).

  `images[indices]` for an int array of any shape returns [*indices.shape, S, S, 3] uint8,
  reading each distinct record once (TFDS array_record random access) and resizing to S.
  Nothing but the data sources' file handles is held.
  """

  def __init__(self, sources: list, image_size: int):
    self._sources = sources
    self._offsets = np.cumsum([0] + [len(s) for s in sources])
    self.image_size = image_size
    self.records_read = 0  # Records decoded so far (for tests and benchmarks).

  @property
  def shape(self) -> tuple[int, ...]:
    return (int(self._offsets[-1]), self.image_size, self.image_size, 3)

  dtype = np.dtype(np.uint8)
  ndim = 4

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, indices) -> np.ndarray:
    if isinstance(indices, slice):
      indices = np.arange(len(self))[indices]
    indices = np.asarray(indices)
    unique, inverse = np.unique(indices.reshape(-1), return_inverse=True)
    if unique.size and (unique[0] < 0 or unique[-1] >= len(self)):
      raise IndexError(f"image index out of range [0, {len(self)})")
    out = np.empty((len(unique), self.image_size, self.image_size, 3), np.uint8)
    which = np.searchsorted(self._offsets, unique, side="right") - 1
    for s, source in enumerate(self._sources):
      positions = np.nonzero(which == s)[0]
      if positions.size:
        records = _read(source, (unique[positions] - self._offsets[s]).tolist())
        for position, record in zip(positions, records):
          out[position] = _to_rgb(np.asarray(record["image"]), self.image_size)
    self.records_read += len(unique)
    return out[inverse].reshape(indices.shape + out.shape[1:])


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """A split: labels and domains in memory, images in memory or streamed.

  Attributes:
    images: [N, H, W, 3] uint8: an array, or a `RecordImages` read on demand.
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

  def subset(self, indices: np.ndarray) -> ImageDataset:
    """The examples `indices`, their images read into memory."""
    return dataclasses.replace(
      self, images=self.images[indices], labels=self.labels[indices], domains=self.domains[indices]
    )


def _builder(name: str, data_dir: str):
  if name.split("/")[0] == EMBEDDED_NAME:
    config = name.split("/")[1] if "/" in name else None
    make = lambda: digits_domains.DigitsDomains(config=config, data_dir=data_dir, file_format="array_record")
    builder = make()
    if not builder.is_prepared():
      # One process generates it at a time (the others then find it prepared); TFDS writes into an
      # `incomplete.*` directory renamed when done, so one left beside it is a killed generation's.
      with files.exclusive_lock(os.path.join(data_dir, f".prepare-{name.replace('/', '-')}")):
        builder = make()
        if not builder.is_prepared():
          _remove_incomplete_generations(builder.data_dir)
          builder.download_and_prepare()
    return builder
  return tfds.builder(name, data_dir=data_dir)


def _remove_incomplete_generations(version_dir: str) -> None:
  """Removes TFDS's `incomplete.<random>_<version>` directories beside `version_dir`: left by a
  generation that was killed (called under the preparation lock, so none is in progress)."""
  parent, version = os.path.split(os.fspath(version_dir).rstrip("/"))
  if not os.path.isdir(parent):
    return
  for entry in os.listdir(parent):
    if entry.startswith(tfds.core.constants.INCOMPLETE_PREFIX) and entry.endswith(f"_{version}"):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def split_examples(name: str, split: str, data_dir: str | None = None) -> int | None:
  """Examples in `split` of `name` ('+'-joined names: the sum), read from the prepared
  metadata only (embedded datasets are generated first); None when the metadata lists no
  splits at all (TFDS mock data), so that reading the data decides.

  Raises:
    ValueError: the dataset is unknown or not prepared in `data_dir`, or has no such split;
      the message names the dataset, the split and the data_dir, not the config field.
  """
  data_dir = data_dir or DEFAULT_DATA_DIR
  total = 0
  for source in name.split("+"):
    try:
      builder = _builder(source, data_dir)
      splits = builder.info.splits
    except Exception as e:  # TFDS raises several kinds for an unknown or unprepared dataset.
      raise ValueError(
        f"no TFDS dataset {source!r} is prepared in data_dir={data_dir!r} and it is not "
        f"embedded ({EMBEDDED_NAME}/...): {type(e).__name__}"
      ) from None
    if not splits:
      return None
    try:
      total += splits[split].num_examples
    except (KeyError, ValueError) as e:
      raise ValueError(f"dataset {source!r} has no split {split!r} (its splits: {', '.join(splits)}): {e}") from None
  return total


def label_names(name: str, data_dir: str | None = None) -> tuple[str, ...]:
  """The class names of `name` (the first of '+'-joined names), from its metadata."""
  builder = _builder(name.split("+")[0], data_dir or DEFAULT_DATA_DIR)
  return tuple(builder.info.features["label"].names)


def prepare_dataset(name: str, data_dir: str | None = None) -> None:
  """Generates the embedded dataset(s) in `name` if not yet there (real datasets must already
  be prepared); e.g. once before several processes read it."""
  for source in name.split("+"):
    _builder(source, data_dir or DEFAULT_DATA_DIR)


class CorruptDataError(OSError):
  """A prepared dataset file cannot be read (corrupt or truncated array_record)."""


def _corrupt(e: Exception) -> bool:
  """Whether `e` is array_record/Riegeli reporting a damaged file."""
  return (
    isinstance(e, RuntimeError)
    and not isinstance(e, NotImplementedError)
    and any(w in str(e) for w in ("Riegeli", "Corrupted"))
  )


class _NamedSource:
  """A TFDS data source whose file errors name the dataset, split and files."""

  def __init__(self, source, builder, name: str, split: str):
    self._source, self._where = source, (builder, name, split)

  def __len__(self) -> int:
    return len(self._source)

  def _error(self, e: Exception) -> CorruptDataError:
    builder, name, split = self._where
    return CorruptDataError(
      f"data: dataset {name!r} split {split!r} has a corrupt or truncated file in {builder.data_dir} "
      f"({builder.info.name}-{split.split('[')[0]}.array_record-*): {e}. Prepare it again (an embedded "
      f"dataset: delete that directory and rerun)."
    )

  def _named(self, read, key):
    """`read(key)`, with a damaged file's error naming the dataset."""
    try:
      return read(key)
    except RuntimeError as e:
      if _corrupt(e):
        raise self._error(e) from e
      raise

  def __getitem__(self, key):
    return self._named(self._source.__getitem__, key)

  def __getitems__(self, keys):
    if not hasattr(self._source, "__getitems__"):
      raise TypeError("no batched read")  # `_read` falls back to one record at a time.
    return self._named(self._source.__getitems__, keys)


def _data_source(builder, name: str, split: str, data_dir: str, decoders=None):
  """Random-access records of a prepared split (array_record), with a clear error otherwise."""
  try:
    return _NamedSource(builder.as_data_source(split=split, decoders=decoders), builder, name, split)
  except (NotImplementedError, FileNotFoundError, AssertionError, ValueError) as e:
    raise FileNotFoundError(
      f"data.name: TFDS dataset {name!r} split {split!r} is not prepared as array_record in "
      f"data_dir={data_dir!r} ({type(e).__name__}). Nothing can be downloaded at run time: "
      f"prepare it on a machine with a network with `tfds build {name} "
      f"--file_format=array_record --data_dir=DIR` and pass that DIR as data.data_dir."
    ) from e
  except RuntimeError as e:
    if _corrupt(e):
      raise _NamedSource(None, builder, name, split)._error(e) from e
    raise


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


def _read(source, keys: list[int]) -> list[dict]:
  """Records `keys` of a data source, in one batched random-access read where it has one."""
  try:
    return list(source.__getitems__(keys))
  except TypeError:  # TFDS mock data sources take no batched read.
    return [source[k] for k in keys]


def _read_all(source) -> list[dict]:
  """Every record of a TFDS data source."""
  return [source[i] for i in range(len(source))]


def _index_pass(
  builder, name: str, split: str, data_dir: str, keys: tuple[str, ...], batch: int = 1024
) -> dict[str, np.ndarray]:
  """{key: [N] int32} for `keys` (label, domain) of every record, holding no image: image
  decoding is skipped where the data source allows it (real array_record files) and each
  batch of records is dropped once read."""
  try:
    source = _data_source(builder, name, split, data_dir, decoders={"image": tfds.decode.SkipDecoding()})
    if len(source):
      source[0]
  except (ImportError, RuntimeError):  # E.g. TFDS mock data, which re-encodes through TensorFlow.
    source = _data_source(builder, name, split, data_dir)
  columns = {key: [] for key in keys}
  for start in range(0, len(source), batch):
    for record in _read(source, list(range(start, min(start + batch, len(source))))):
      for key in keys:
        columns[key].append(record[key])
  return {key: np.asarray(values, np.int32) for key, values in columns.items()}


def load_image_dataset(
  name: str, split: str, data_dir: str | None = None, image_size: int | None = None, stream: bool = False
) -> ImageDataset:
  """Reads a split's labels and domains, and its images into memory or as a stream.

  Args:
    name: TFDS name, or several joined by `+` (each one domain).
    split: TFDS split, e.g. `train`, `test`, `pretrain`, `train[:10%]`.
    data_dir: TFDS data directory (default: `~/.cache/hyperlora_jax/tensorflow_datasets`).
    image_size: resize every image to [image_size, image_size] (None keeps stored sizes,
      which must then agree; a stream takes the first image's size).
    stream: images as a `RecordImages` read on demand (the index pass skips image decoding).
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
    own_domains = "domain" in features and len(names) == 1
    if stream:
      columns = _index_pass(builder, source, split, data_dir, ("label", "domain") if own_domains else ("label",))
      images = _data_source(builder, source, split, data_dir)
      if image_size is None and len(images):
        image_size = _to_rgb(np.asarray(images[0]["image"]), None).shape[0]
    else:
      records = _read_all(_data_source(builder, source, split, data_dir))
      images = np.stack([_to_rgb(np.asarray(r["image"]), image_size) for r in records])
      columns = {
        key: np.array([r[key] for r in records], np.int32)
        for key in (("label", "domain") if own_domains else ("label",))
      }
    labels = columns["label"]
    if own_domains:
      domains = columns["domain"]
      domain_names = list(features["domain"].names)
    else:
      domains = np.full(len(labels), source_index, np.int32)
      domain_names.append(source)
    parts.append((images, labels, domains))
  images = RecordImages([p[0] for p in parts], image_size) if stream else np.concatenate([p[0] for p in parts])
  return ImageDataset(
    images=images,
    labels=np.concatenate([p[1] for p in parts]),
    domains=np.concatenate([p[2] for p in parts]),
    num_classes=int(num_classes),
    domain_names=tuple(domain_names),
    class_names=class_names,
  )
