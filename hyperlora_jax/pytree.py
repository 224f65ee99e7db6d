"""`Tree`: any JAX pytree (nested dicts, lists, tuples, NamedTuples and dataclasses of arrays),
the one alias the library's signatures use for "a pytree of this shape"."""

from typing import Any

Tree = Any
