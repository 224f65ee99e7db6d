"""Primitives on a clients axis: broadcast, map over clients, weighted reduce.

A *clients-placed* value is a pytree whose leaves have a leading `[C, ...]` axis, one slice
per client (DrJAX's `clients` placement). Three primitives move values between the server
and the clients, and every one of them is a pure, differentiable JAX function:

  broadcast(tree, C)                      server [...] -> clients [C, ...]
  map_clients(fn, xs, clients_per_chunk, mesh)  clients -> clients, `fn` on each client
                                          (`host_loader`: each chunk's inputs read on the host;
                                          `HostFeed`: the inputs held in host memory, moved a
                                          chunk at a time)
  weighted_mean(tree, weights)            clients [C, ...] x [C] -> server [...]

`map_clients` is where memory and devices are decided: clients are vmapped
`clients_per_chunk` at a time (a `lax.map` over chunks bounds activation memory by the knob,
not by the cohort) and the clients axis is sharded over a `Mesh` axis named `clients`.

Why not DrJAX itself: `drjax.map_fn` vmaps the whole placement at once (no chunking), and its
placement size is fixed when the program is built; the engine needs a memory knob and
padded cohorts whose size the caller picks. The primitives below keep DrJAX's vocabulary
and its properties (pure, differentiable, mesh-sharded), in about sixty lines.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hyperlora_jax import quantize
from hyperlora_jax.pytree import Tree

CLIENTS_AXIS = "clients"
MODEL_AXIS = "model"


def make_mesh(num_devices: int = 0, model_parallel: int = 1) -> Mesh:
  """A mesh over the first `num_devices` devices (0: all): 1-D, axis `clients`, or with
  `model_parallel` = M > 1 a 2-D [num_devices / M, M] mesh with axes (`clients`, `model`):
  clients spread over the first, the frozen backbone (`shard_frozen`) over the second.

  Args:
    num_devices: devices to use, the first of `jax.devices()` (0: all).
    model_parallel: M, the size of the `model` axis (1: none).
  Returns:
    A `Mesh` with axes ("clients",) or ("clients", "model").
  Raises:
    ValueError: more devices than exist, or M not dividing them.
  """
  devices = jax.devices()
  num_devices = num_devices or len(devices)
  if num_devices > len(devices):
    raise ValueError(f"mesh.num_devices={num_devices} but only {len(devices)} devices exist")
  if model_parallel < 1 or num_devices % model_parallel:
    raise ValueError(f"model_parallel={model_parallel} must be >= 1 and divide the {num_devices} devices")
  if model_parallel == 1:
    return Mesh(np.array(devices[:num_devices]), (CLIENTS_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
  grid = np.array(devices[:num_devices]).reshape(num_devices // model_parallel, model_parallel)
  return Mesh(grid, (CLIENTS_AXIS, MODEL_AXIS), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def clients_axis_size(mesh: Mesh | None) -> int:
  """Devices along the mesh's `clients` axis (1 without a mesh): how many ways a cohort splits.

  Args:
    mesh: a mesh with a `clients` axis, or None.
  Returns:
    Its size, 1 without a mesh.
  """
  return 1 if mesh is None else mesh.shape[CLIENTS_AXIS]


def model_axis_size(mesh: Mesh | None) -> int:
  """Devices along the mesh's `model` axis (1 without one).

  Args:
    mesh: a mesh, or None.
  Returns:
    The size of its `model` axis, 1 without one.
  """
  return 1 if mesh is None or MODEL_AXIS not in mesh.shape else mesh.shape[MODEL_AXIS]


def clients_sharding(mesh: Mesh) -> NamedSharding:
  """Shards a leading clients axis over the mesh's `clients` axis (replicated over `model`).

  Args:
    mesh: a mesh with a `clients` axis.
  Returns:
    NamedSharding(mesh, P("clients")).
  """
  return NamedSharding(mesh, P(CLIENTS_AXIS))


def frozen_spec(shape: tuple[int, ...], model_devices: int) -> P:
  """The PartitionSpec of a frozen weight of `shape` on a `model` axis of `model_devices`: its
  largest dimension that `model_devices` divides is split over `model` (the last such on ties),
  the rest replicated; a weight with no such dimension is replicated.

  Args:
    shape: the weight's shape.
    model_devices: M, the size of the `model` axis.
  Returns:
    A PartitionSpec with "model" on at most one dimension.
  """
  candidates = [i for i, d in enumerate(shape) if d % model_devices == 0 and d >= model_devices]
  if model_devices == 1 or not candidates:
    return P()
  axis = max(candidates, key=lambda i: (shape[i], i))
  return P(*[MODEL_AXIS if i == axis else None for i in range(len(shape))])


def frozen_shardings(tree: Tree, mesh: Mesh) -> Tree:
  """Where each frozen weight lives on `mesh`: split over the `model` axis by `frozen_spec`,
  replicated over `clients` (everything replicated without a `model` axis). Works on
  `jax.ShapeDtypeStruct`s, so a round can be planned for devices it is not run on.

  Args:
    tree: the frozen pytree (arrays or ShapeDtypeStructs).
    mesh: the run's mesh.
  Returns:
    `tree`'s structure with `NamedSharding` leaves.
  """
  model_devices = model_axis_size(mesh)

  def one(x):
    if not quantize.is_quantized(x):
      return NamedSharding(mesh, frozen_spec(tuple(jnp.shape(x)), model_devices))
    return x.replace(  # Codes and scales split on the weight's axis, where it divides theirs.
      codes=NamedSharding(mesh, _quantized_part_spec(x.shape, jnp.shape(x.codes), model_devices)),
      scales=NamedSharding(mesh, _quantized_part_spec(x.shape, jnp.shape(x.scales), model_devices)),
    )

  return jax.tree.map(one, tree, is_leaf=quantize.is_quantized)


def _quantized_part_spec(weight_shape: tuple[int, ...], part_shape: tuple[int, ...], model_devices: int) -> P:
  """A quantized weight's codes or scales ([rows', *weight_shape[1:]]) split over `model` on the
  axis `frozen_spec` splits the weight on, where the part's length there divides; else replicated."""
  spec = frozen_spec(weight_shape, model_devices)
  axes = [i for i, name in enumerate(spec) if name is not None]
  if not axes or part_shape[axes[0]] % model_devices:
    return P()
  return spec


def shard_frozen(tree: Tree, mesh: Mesh | None) -> Tree:
  """The frozen backbone placed on `mesh`: each weight split over the `model` axis
  (`frozen_spec`) and replicated over `clients`, so every client of every device uses the one
  copy and a device holds about 1/M of it; XLA inserts the gathers the matmuls need. Without a
  `model` axis: `tree` unchanged.

  Args:
    tree: the frozen pytree (host or device arrays).
    mesh: the run's mesh, or None.
  Returns:
    `tree` placed on the mesh (`jax.device_put`).
  """
  if mesh is None or model_axis_size(mesh) == 1:
    return tree
  return jax.device_put(tree, frozen_shardings(tree, mesh))


def constrain_clients(tree: Tree, mesh: Mesh | None) -> Tree:
  """`tree` ([C, ...] leaves) constrained to be sharded over the mesh's clients axis.

  Args:
    tree: pytree of [C, ...] arrays, inside a jitted function.
    mesh: the run's mesh, or None (no constraint; nor on one device).
  Returns:
    `tree`, with its sharding constrained.
  """
  if mesh is None or mesh.size == 1:
    return tree
  return jax.lax.with_sharding_constraint(tree, clients_sharding(mesh))


def broadcast(tree: Tree, num_clients: int) -> Tree:
  """Server value -> the same value on every client: [...] -> [num_clients, ...].

  Args:
    tree: the server's pytree.
    num_clients: C.
  Returns:
    pytree of [C, ...] arrays (broadcasts, no copy until written).
  """
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + jnp.shape(x)), tree)


def map_clients(
  fn: Callable,
  xs: Tree,
  clients_per_chunk: int = 0,
  mesh: Mesh | None = None,
  load_chunk: Callable[[Tree], Tree] | None = None,
) -> Tree:
  """vmap `fn` over the leading clients axis of `xs`, `clients_per_chunk` clients at a time.

  On a mesh, client c = j * num_chunks + i is computed in chunk i at position j, so with the
  clients axis sharded contiguously over D devices (and D dividing clients_per_chunk) every
  device works on its own clients in every chunk, with no data movement. Without one, chunk i
  is clients [i k, (i + 1) k): a free reshape, where the interleaved order would copy the
  inputs (a round's images) once more. Each client's result is the same either way.

  Args:
    fn: per-client function on one client's slice of `xs`.
    xs: pytree of [C, ...] arrays.
    clients_per_chunk: clients vmapped together (0 or >= C: all at once); must divide C.
    mesh: shard the clients axis over this mesh's `clients` axis (None: no constraint).
    load_chunk: applied to each chunk of `xs` ([k, ...] leaves) before `fn` is vmapped over
      it, e.g. `host_loader`, which reads the chunk's data on the host: then only one chunk
      of the inputs is ever materialized, not the whole cohort's.
  Returns:
    pytree of [C, ...] outputs.
  """
  num = jax.tree.leaves(xs)[0].shape[0]
  load_chunk = load_chunk or (lambda chunk: chunk)
  vmapped = lambda chunk: constrain_clients(jax.vmap(fn)(constrain_clients(load_chunk(chunk), mesh)), mesh)
  if not clients_per_chunk or clients_per_chunk >= num:
    return vmapped(xs)
  if num % clients_per_chunk:
    raise ValueError(f"clients_per_chunk={clients_per_chunk} must divide the padded cohort of {num} clients")
  num_chunks = num // clients_per_chunk
  # Each chunk sliced from the inputs where they lie (device or host memory), then loaded: no
  # reordered copy of the whole cohort's inputs (on a mesh, a transpose of [C, ...] would be one).
  ys = jax.lax.map(lambda i: vmapped(jax.tree.map(lambda x: _chunk(x, i, clients_per_chunk, mesh), xs)),
                   jnp.arange(num_chunks))  # fmt: skip
  if clients_axis_size(mesh) == 1:
    return jax.tree.map(lambda y: y.reshape((num,) + y.shape[2:]), ys)
  return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape((num,) + y.shape[2:]), ys)


def _chunk(x: jax.Array, index: jax.Array, clients_per_chunk: int, mesh: Mesh | None) -> jax.Array:
  """`map_clients`' chunk `index` of x [C, ...] -> [k, ...], in its order (clients i k .. (i + 1) k
  on one device, c = j num_chunks + i on a mesh), by a slice of x: no copy of the whole of it."""
  if clients_axis_size(mesh) == 1:
    return jax.lax.dynamic_slice_in_dim(x, index * clients_per_chunk, clients_per_chunk, axis=0)
  grouped = x.reshape((clients_per_chunk, x.shape[0] // clients_per_chunk) + x.shape[1:])
  return jax.lax.dynamic_index_in_dim(grouped, index, axis=1, keepdims=False)


def host_loader(load: Callable[[Tree], Tree], output_shapes: Callable[[Tree], Tree]) -> Callable[[Tree], Tree]:
  """A traceable `load_chunk` for `map_clients` that runs `load` on the host.

  Args:
    load: NumPy function from a chunk of light inputs (e.g. example indices, [k, ...] leaves)
      to the chunk's full inputs (e.g. the images), called once per chunk inside the jitted
      computation (`jax.pure_callback`).
    output_shapes: light `jax.ShapeDtypeStruct`s -> the full inputs' ShapeDtypeStructs.
  Single device only: the callback sees the chunk whole.
  Returns:
    `load_chunk(light chunk) -> full chunk`, for `map_clients`.
  """

  def load_chunk(light: Tree) -> Tree:
    shapes = output_shapes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), light))
    return jax.pure_callback(load, shapes, light)

  return load_chunk


HOST_MEMORY = "pinned_host"
DEVICE_MEMORY = "device"


def memory_sharding(mesh: Mesh | None, memory_kind: str) -> jax.sharding.Sharding:
  """A leading clients axis sharded as `clients_sharding` says (no mesh: on the first device), in
  the devices' memory of `memory_kind` ("device" or "pinned_host").

  Args:
    mesh: a mesh with a `clients` axis, or None.
    memory_kind: `DEVICE_MEMORY` or `HOST_MEMORY`.
  Returns:
    The sharding.
  """
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=memory_kind)
  return NamedSharding(mesh, P(CLIENTS_AXIS), memory_kind=memory_kind)


def has_host_memory(device: jax.Device) -> bool:
  """Whether `device` can address pinned host memory (`HostFeed` needs it).

  Args:
    device: a device (compile-only ones included).
  Returns:
    True where it lists a "pinned_host" memory.
  """
  try:
    return any(memory.kind == HOST_MEMORY for memory in device.addressable_memories())
  except Exception:  # Compile-only devices of some plugins list no memories.
    return False


@dataclasses.dataclass(frozen=True)
class HostFeed:
  """A round's batches held in the host's pinned memory, each chunk moved to the devices inside the
  round's chunk loop: device memory holds one chunk of the inputs, not the cohort's, on any number
  of devices (`host_loader`, which reads a chunk with a callback, is single-device).

      feed = HostFeed.of(batches, mesh)
      round_ = FederatedRound(..., mesh=mesh, clients_per_chunk=k, load_batches=feed.load)
      round_.step(state, frozen, feed.place(batches), ids, weights)

  Byte leaves (uint8 [C, S, B, *rest], prod(rest) a multiple of 4) are held as uint32 words
  [C, S, B, prod(rest) / 4] and turned back into bytes on the device (exactly): the TPU compiler
  (libtpu 0.0.42) fails on uint8 arrays in host memory (their host and device tilings differ).

  Attributes:
    mesh: the round's mesh (None: one device).
    byte_shapes: ((leaf path, rest), ...): the byte leaves held as words, and their trailing shape.
  """

  mesh: Mesh | None
  byte_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

  @classmethod
  def of(cls, batches: Tree, mesh: Mesh | None) -> HostFeed:
    """The feed of batches shaped like `batches`.

    Args:
      batches: a round's batches ([C, S, B, ...] arrays or ShapeDtypeStructs; C may be any).
      mesh: the round's mesh (None: one device).
    Returns:
      The `HostFeed`, its byte leaves found in `batches`.
    """
    byte_shapes = tuple(
      (jax.tree_util.keystr(path), tuple(leaf.shape[3:]))
      for path, leaf in jax.tree_util.tree_flatten_with_path(batches)[0]
      if _packs(leaf)
    )
    return cls(mesh, byte_shapes)

  def _map(self, fn: Callable, tree: Tree) -> Tree:
    rests = dict(self.byte_shapes)
    return jax.tree_util.tree_map_with_path(lambda path, x: fn(x, rests.get(jax.tree_util.keystr(path))), tree)

  def held(self, batches: Tree) -> Tree:
    """`batches` as held in host memory, for planning (`hyperlora_jax.plan`).

    Args:
      batches: [C, S, B, ...] arrays or ShapeDtypeStructs.
    Returns:
      ShapeDtypeStructs with the host sharding, byte leaves as [C, S, B, bytes / 4] uint32.
    """
    sharding = self.host_sharding

    def spec(x, rest):
      shape, dtype = (x.shape[:3] + (math.prod(rest) // 4,), jnp.uint32) if rest is not None else (x.shape, x.dtype)
      return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    return self._map(spec, batches)

  @property
  def host_sharding(self) -> jax.sharding.Sharding:
    """Where the batches are held: the clients axis sharded as on the devices, in pinned host memory."""
    return memory_sharding(self.mesh, HOST_MEMORY)

  def pack(self, batches: Tree) -> Tree:
    """`batches` with their byte leaves as uint32 words (a view where they are contiguous).

    Args:
      batches: NumPy (or JAX) [C, S, B, ...] arrays.
    Returns:
      NumPy arrays, byte leaves [C, S, B, bytes / 4] uint32.
    """
    words = lambda x, rest: x if rest is None else np.ascontiguousarray(x).reshape(x.shape[:3] + (-1,)).view(np.uint32)
    return self._map(lambda x, rest: words(np.asarray(x), rest), batches)

  def place(self, batches: Tree) -> Tree:
    """`batches` ([C, S, B, ...] NumPy or JAX arrays) in pinned host memory, sharded over clients.

    Args:
      batches: a round's batches, shaped like those the feed was made `of`.
    Returns:
      The same tree, byte leaves as words (`pack`), on the host.
    """
    return jax.device_put(self.pack(batches), self.host_sharding)

  def load(self, chunk: Tree) -> Tree:
    """`FederatedRound.load_batches` / `map_clients`' load_chunk (traceable).

    Args:
      chunk: [k, S, B, ...] leaves in host memory, byte leaves as words.
    Returns:
      The chunk in device memory, byte leaves unpacked to their [k, S, B, *rest] uint8.
    """
    on_device = jax.device_put(chunk, memory_sharding(self.mesh, DEVICE_MEMORY))
    unpack = lambda x, rest: (
      x if rest is None else jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(x.shape[:3] + rest)
    )
    return self._map(unpack, on_device)


def _packs(leaf) -> bool:
  """Whether a batch leaf is held as words: uint8 with trailing axes of a multiple of 4 bytes."""
  return leaf.dtype == jnp.uint8 and len(leaf.shape) > 3 and math.prod(leaf.shape[3:]) % 4 == 0


def weighted_mean(tree: Tree, weights: jax.Array) -> Tree:
  """Σ_k w_k x_k over the leading clients axis. [C, ...] x [C] -> [...].

  With weights summing to 1 this is the weighted mean (FedAvg's reduce).

  Args:
    tree: pytree of [C, ...] arrays.
    weights: [C].
  Returns:
    pytree of [...] arrays, each leaf's dtype.
  """
  return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), tree)


def gather_clients(tree: Tree, client_ids: jax.Array) -> Tree:
  """Rows `client_ids` [C] of a per-client store ([N, ...] leaves) -> [C, ...].

  Args:
    tree: per-client store, [N, ...] leaves.
    client_ids: [C] ints in [0, N).
  Returns:
    pytree of [C, ...] arrays.
  """
  return jax.tree.map(lambda x: x[client_ids], tree)


def scatter_clients(store: Tree, client_ids: jax.Array, values: Tree) -> Tree:
  """`store` ([N, ...]) with rows `client_ids` [C] set to `values` ([C, ...]); ids out of
  range (e.g. N for padding clients) are dropped.

  Args:
    store: per-client store, [N, ...] leaves.
    client_ids: [C] ints; N or more (padding) writes nothing.
    values: pytree of [C, ...] arrays, `store`'s structure.
  Returns:
    The updated store (a new pytree; `store` is not modified).
  """
  return jax.tree.map(lambda s, v: s.at[client_ids].set(v, mode="drop"), store, values)


def is_finite(tree: Tree) -> jax.Array:
  """Scalar bool: every entry of every leaf is finite.

  Args:
    tree: any pytree of arrays.
  Returns:
    Scalar bool array (True for an empty tree).
  """
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def is_sound(tree: Tree, limit: float | None) -> jax.Array:
  """Scalar bool: every entry of every floating leaf is finite and (limit not None) at most
  `limit` in magnitude.

  Args:
    tree: any pytree of arrays (integer leaves are not checked).
    limit: the largest magnitude allowed, or None (finiteness only).
  Returns:
    Scalar bool array.
  """
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  if limit is None:
    return is_finite(leaves)
  checks = [jnp.all(jnp.abs(x) <= limit) for x in leaves]  # False for NaN too.
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def keep_if(ok: jax.Array, new: Tree, old: Tree) -> Tree:
  """`new` where the scalar `ok`, else `old` (same structure).

  Args:
    ok: scalar bool array.
    new, old: pytrees of one structure and shapes.
  Returns:
    `new` if `ok` else `old`, leaf by leaf (traceable: `jnp.where`).
  """
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
