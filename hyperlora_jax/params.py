"""Pure helpers on nested-dict pytrees, e.g. `{"lora": {path: {"a", "b"}}, "head": {...}}`.

A *leaf name* is the '/'-joined key path of a leaf, e.g.
`lora/encoder/block_0/attn/query/a` or `head/kernel`; methods select leaves (local, frozen)
by `re.fullmatch` on these names.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.pytree import Tree


def leaf_names(tree: Tree) -> Tree:
  """Same structure as `tree`, each leaf replaced by its '/'-joined key path.

  Args:
    tree: any pytree (dict keys and sequence indices name the path).
  Returns:
    `tree`'s structure with str leaves, e.g. "lora/encoder/block_0/attn/query/a".
  """

  def name(path, _):
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

  return jax.tree_util.tree_map_with_path(name, tree)


def regex_mask(tree: Tree, regex: str | None) -> Tree:
  """Python-bool tree: True where the leaf name fullmatches `regex` (all False for None/'').

  Args:
    tree: any pytree.
    regex: fullmatched against each leaf name, or None / "" (nothing).
  Returns:
    `tree`'s structure with Python bool leaves (static, usable in jit).
  """
  pattern = re.compile(regex) if regex else None
  return jax.tree.map(lambda n: bool(pattern and pattern.fullmatch(n)), leaf_names(tree))


def select(tree: Tree, mask: Tree) -> dict[str, Any]:
  """{leaf name: leaf} for the leaves where the static `mask` is True (any leading axes kept).

  Args:
    tree: any pytree.
    mask: `tree`'s structure with bool leaves (`regex_mask`).
  Returns:
    {leaf name: leaf}.
  """
  names, leaves, keep = (jax.tree.leaves(t) for t in (leaf_names(tree), tree, mask))
  return {n: x for n, x, k in zip(names, leaves, keep) if k}


def combine(tree: Tree, replacements: dict[str, Any]) -> Tree:
  """`tree` with the leaves named in `replacements` swapped for those values.

  Args:
    tree: any pytree.
    replacements: {leaf name: new leaf} (`select`'s keys).
  Returns:
    `tree`'s structure with those leaves replaced.
  """
  return jax.tree.map(lambda n, x: replacements.get(n, x), leaf_names(tree), tree)


def num_bytes(tree: Tree, mask: Tree | None = None) -> int:
  """Bytes of the (masked-in) leaves: what sending them would cost.

  Args:
    tree: any pytree of arrays or ShapeDtypeStructs.
    mask: `tree`'s structure with bool leaves, or None (every leaf).
  Returns:
    The byte count, an int.
  """
  leaves = jax.tree.leaves(tree)
  keep = jax.tree.leaves(mask) if mask is not None else [True] * len(leaves)
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x, k in zip(leaves, keep) if k))
