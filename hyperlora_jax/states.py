"""Typed states, like optax's, that are checkpointed as the plain dicts they replace.

    @states.typed_state
    @dataclasses.dataclass(frozen=True)
    class MyState(states.TypedState):
      params: Tree
      rng: jax.Array | None = None      # None: absent (not in the dict, not a leaf)

    tree = states.as_tree(state)         # nested plain dicts: the checkpoint layout
    state = states.like(template, tree)  # back to the template's types (a restored checkpoint)

A `TypedState` is a frozen dataclass registered as a pytree (every field a data field, so
`jax.jit`, `jax.tree.map` and shardings see through it). A field that is None is absent: it
holds no leaves and is left out of its dict, so optional parts (a noise key under DP, a metric
of one variant) keep the dict layout of checkpoints written before the state was typed.
`state["name"]` and `"name" in state` read it as that dict.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar, cast

import jax

from hyperlora_jax.pytree import Tree

S = TypeVar("S", bound="TypedState")


def _fields(state: Any) -> tuple[dataclasses.Field, ...]:
  """`dataclasses.fields` of a typed state (its subclasses are dataclasses; the base is not)."""
  return dataclasses.fields(state)


def typed_state(cls: type[S]) -> type[S]:
  """Registers the dataclass `cls` as a pytree whose fields are all data (a class decorator).

  Args:
    cls: a dataclass.
  Returns:
    `cls`, registered with `jax.tree_util`.
  """
  return jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in _fields(cls)], meta_fields=[])


class TypedState:
  """Base of the typed states (module docstring). `DICT_KEYS`: {field: its key in the dict},
  for fields whose dict key is not their name."""

  DICT_KEYS: ClassVar[dict[str, str]] = {}

  def as_dict(self) -> dict:
    """{key: value} of the fields that are not None, nested typed states as dicts too.

    Returns:
      A dict (the checkpoint layout).
    """
    return {
      self.DICT_KEYS.get(f.name, f.name): as_tree(getattr(self, f.name))
      for f in _fields(self)
      if getattr(self, f.name) is not None
    }

  def replace(self: S, **changes) -> S:
    """A copy with the fields in `changes` replaced (`dataclasses.replace`).

    Args:
      changes: {field: new value}.
    Returns:
      A new state of this type.
    """
    return dataclasses.replace(cast(Any, self), **changes)

  def _field(self, key: str) -> str:
    for name, dict_key in self.DICT_KEYS.items():
      if key == dict_key:
        return name
    return key

  def __getitem__(self, key: str) -> Any:
    value = getattr(self, self._field(key), None)
    if value is None:
      raise KeyError(f"{key}: {type(self).__name__} has no such entry")
    return value

  def __contains__(self, key: str) -> bool:
    return getattr(self, self._field(key), None) is not None


def as_tree(tree: Tree) -> Tree:
  """`tree` with every `TypedState` in it (in dicts, lists, tuples) as its dict.

  Args:
    tree: any pytree.
  Returns:
    The same pytree of dicts (what checkpoints store).
  """
  if isinstance(tree, TypedState):
    return tree.as_dict()
  if isinstance(tree, dict):
    return {k: as_tree(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
    return type(tree)(as_tree(v) for v in tree)
  return tree


def like(template: Tree, tree: Tree) -> Tree:
  """`tree` (in `as_tree(template)`'s layout) with `template`'s typed states rebuilt: the
  inverse of `as_tree` for a state shaped like `template`.

  Args:
    template: a state holding typed states.
    tree: the same state as dicts.
  Returns:
    `tree` with `template`'s types.
  """
  if isinstance(template, TypedState):
    values = {}
    for f in _fields(template):
      sub = getattr(template, f.name)
      key = template.DICT_KEYS.get(f.name, f.name)
      values[f.name] = None if sub is None else like(sub, tree[key])
    return type(template)(**values)
  if isinstance(template, dict):
    return {k: like(template[k], v) if k in template else v for k, v in tree.items()}
  if isinstance(template, (list, tuple)) and not hasattr(template, "_fields"):
    return type(template)(like(t, v) for t, v in zip(template, tree))
  return tree


def without(state: Tree, names: tuple[str, ...] | list[str]) -> Tree:
  """`state` (a typed state or a dict) without its entries `names` (None in a typed state).

  Args:
    state: a typed state or a dict.
    names: the entries to drop.
  Returns:
    A new state of `state`'s type.
  """
  if not names:
    return state
  if isinstance(state, TypedState):
    return state.replace(**dict.fromkeys(names))
  return {k: v for k, v in state.items() if k not in names}


def with_entries(state: Tree, source: Tree, names: tuple[str, ...] | list[str]) -> Tree:
  """`state` with the entries `names` of `source` put back (`without`'s inverse).

  Args:
    state: `without(source, names)`.
    source: the state the entries come from.
    names: the entries to put back.
  Returns:
    A new state of `state`'s type.
  """
  if not names:
    return state
  if isinstance(state, TypedState):
    return state.replace(**{name: source[name] for name in names})
  return {**state, **{name: source[name] for name in names}}
