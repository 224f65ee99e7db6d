"""`digits_domains`: an embedded, offline, multi-domain image dataset as a TFDS builder.

Built from the 1,797 8x8 digits that scikit-learn ships (no network), rendered
deterministically (seed 0) into the domains of `render.py`. The base images are split
once, so no handwritten digit appears in two splits:

  pretrain  30% of the base digits x 6 jittered renderings in the `source` domain
            (the backbone's pretraining distribution; never seen by federated clients)
  train     56% of the base digits x the 6 federated domains (the clients' training pool)
  test      14% of the base digits x the 6 federated domains (the clients' test pool)

Sizes at any resolution: pretrain 3,234, train 6,036, test 1,512 examples (`res16x10`: train
and test 10x, each digit rendered 10 times per domain); 10 classes
(chance accuracy 10%). Features: `image` uint8 [res, res, 3] (a `Tensor`, so neither
encoding nor reading needs TensorFlow), `label` (0-9, named zero ... nine), `domain` (index into
`render.ALL_DOMAINS`). Stored as array_record; read with `as_data_source`.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from experiments.runner.data import render

_SEED = 0
_PRETRAIN_FRACTION = 0.30
_TEST_FRACTION_OF_FEDERATED = 0.20
_PRETRAIN_RENDERINGS = 6
CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def split_base_indices(num_base: int) -> dict[str, np.ndarray]:
  """Disjoint base-digit indices for the three splits (a fixed permutation, seed 0)."""
  perm = np.random.default_rng(_SEED).permutation(num_base)
  n_pre = int(round(_PRETRAIN_FRACTION * num_base))
  fed = perm[n_pre:]
  n_test = int(round(_TEST_FRACTION_OF_FEDERATED * len(fed)))
  return {"pretrain": np.sort(perm[:n_pre]), "train": np.sort(fed[n_test:]), "test": np.sort(fed[:n_test])}


class DigitsDomainsConfig(tfds.core.BuilderConfig):
  """A resolution of `digits_domains`."""

  def __init__(self, *, resolution: int, renderings: int = 1, **kwargs):
    super().__init__(**kwargs)
    self.resolution = resolution
    self.renderings = renderings  # Jittered renderings per (digit, domain) in train and test.


class DigitsDomains(tfds.core.GeneratorBasedBuilder):
  """Scikit-learn digits rendered in a pretraining domain and six federated domains."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "Class names (zero ... nine) for text prompts."}
  BUILDER_CONFIGS = [
    DigitsDomainsConfig(name=f"res{r}", resolution=r, description=f"{r}x{r} RGB") for r in (16, 24, 32)
  ] + [
    DigitsDomainsConfig(
      name="res16x10",
      resolution=16,
      renderings=10,
      description="16x16 RGB, 10 renderings per digit and domain: 10x the train "
      "and test examples (for memory benchmarks)",
    )
  ]
  DEFAULT_CONFIG_NAME = "res16"

  def _info(self) -> tfds.core.DatasetInfo:
    res = self.builder_config.resolution
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(res, res, 3), dtype=np.uint8),
          "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
          "domain": tfds.features.ClassLabel(names=list(render.ALL_DOMAINS)),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is generated locally.
    return {name: self._generate_examples(name) for name in ("pretrain", "train", "test")}

  def _generate_examples(self, split: str):
    from sklearn.datasets import load_digits  # Bundled with scikit-learn: no download.

    digits = load_digits()
    base = split_base_indices(len(digits.target))[split]
    res = self.builder_config.resolution
    split_seed = {"pretrain": 1, "train": 2, "test": 3}[split]
    rng = np.random.default_rng([_SEED, split_seed, res])
    if split == "pretrain":
      jobs = [(i, render.SOURCE_DOMAIN, k) for i in base for k in range(_PRETRAIN_RENDERINGS)]
    else:
      jobs = [(i, d, k) for i in base for d in render.FEDERATED_DOMAINS for k in range(self.builder_config.renderings)]
    for i, domain, k in jobs:
      image = render.render_digit(digits.images[i], domain, res, rng)
      yield f"{i}_{domain}_{k}", {"image": image, "label": int(digits.target[i]), "domain": domain}
