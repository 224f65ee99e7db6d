r"""Adapters out and in: Hugging Face PEFT's on-disk LoRA layout.

    save_peft(directory, adapter, alpha=8.0)      # adapter_model.safetensors + adapter_config.json
    adapter, config = load_peft(directory)
    # A model loaded from Hugging Face: its own module names, so `peft` attaches the adapter.
    save_peft(directory, adapter, alpha=8.0, module_name=models.hf.vit_module_name)
    adapter, config = load_peft(directory, paths=list(adapter), module_name=models.hf.vit_module_name)

Layout (PEFT's `LoraModel`; our kernel-layout factors transposed):
  base_model.model.<module name>.lora_A.weight    [r, d_in]   = aᵀ     (a linear layer)
  base_model.model.<module name>.lora_B.weight    [d_out, r]  = bᵀ
  base_model.model.<module name>.lora_embedding_A [r, vocab]  = aᵀ     (an embedding table,
  base_model.model.<module name>.lora_embedding_B [d, r]      = bᵀ      `embeddings=` below)
so PEFT's `ΔW = (lora_alpha / r) · lora_B @ lora_A` [d_out, d_in] is `(s a b)ᵀ`, the transpose
of the Flax-kernel update `lora.merge` adds. For layers other than `nn.Dense`, d_in and d_out
are the flattened sizes of `hyperlora_jax.lora`'s layouts (e.g. a Conv's window × c_in).
The module name is `module_name(path)` (default: the Flax path with '.' for '/'), and
adapter_config.json's `target_modules` are those exact names, so no other module with the same
last name is hooked; it holds only fields of peft's `LoraConfig`. The Flax paths are kept in a
file of their own (`hyperlora_jax_adapter.json`), which `load_peft` reads when present.

Per-layer ranks and alphas. PEFT's `rank_pattern` / `alpha_pattern` give some modules another
r or lora_alpha (the first key `k` with `re.match(rf"(.*\.)?({k})$", module)`, as peft does).
`load_peft` returns one adapter for one scale, `scale_from_config(config)`: each layer's b is
multiplied by its own scale over that one (`layer_scales`), so `lora.apply(..., scale=s)` gives
PEFT's output on every layer. `save_peft` writes layers of different ranks with a
`rank_pattern` and the `alpha_pattern` that keeps their one scale. Config fields that change the computation in ways this layout cannot hold
(DoRA, LoRA biases, modules_to_save, trainable tokens, ...) are refused by name.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any
from collections.abc import Callable, Collection, Mapping

import numpy as np

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PATHS_FILE = "hyperlora_jax_adapter.json"  # {"module_paths": {module name: Flax path}}
PREFIX = "base_model.model."
ModuleName = Callable[[str], "str | None"]


def default_module_name(path: str) -> str:
  """The Flax module path with '.' for '/' (a model of this project's own).

  Args:
    path: a '/'-joined Flax module path.
  Returns:
    The '.'-joined name.
  """
  parts = path.split("/")
  if any("." in p or not p for p in parts):
    raise ValueError(
      f"module path {path!r}: PEFT names join path parts with '.', so no part may contain '.' or be empty"
    )
  return ".".join(parts)


def module_names(paths, module_name: ModuleName | None = None) -> dict[str, str]:
  """{Flax path: PEFT module name} (raises ValueError for a path the naming does not know).

  Args:
    paths: the Flax module paths of the adapter's layers.
    module_name: Flax path -> PEFT module name (None for a path it does not know); default
      `default_module_name`.
  Returns:
    {Flax path: PEFT module name}.
  """
  name_of = module_name or default_module_name
  names = {}
  for path in paths:
    name = name_of(path)
    if not name:
      raise ValueError(f"module path {path!r} has no module in the reference model (module_name gave {name!r})")
    names[path] = name
  return names


LINEAR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
EMBEDDING_SUFFIXES = (".lora_embedding_A", ".lora_embedding_B")
# LoraConfig fields whose non-default values change what the adapter computes beyond
# (lora_alpha / r) · B A per module: an adapter using one is refused, not loaded as plain LoRA.
UNSUPPORTED_FIELDS = (
  "use_dora",
  "lora_bias",
  "modules_to_save",
  "trainable_token_indices",
  "target_parameters",
  "layer_replication",
  "alora_invocation_tokens",
  "use_qalora",
  "use_bdlora",
  "velora_config",
  "monteclora_config",
  "arrow_config",
  "kasa_config",
)


def to_peft_tensors(
  adapter: Mapping[str, Mapping[str, Any]], module_name: ModuleName | None = None, embeddings: Collection[str] = ()
) -> dict[str, np.ndarray]:
  """{path: {"a": [d_in, r], "b": [r, d_out]}} -> {PEFT name: array} (see the module docstring);
  the layers whose paths are in `embeddings` (embedding tables) get PEFT's embedding names.

  Args:
    adapter: {path: {"a": [d_in, r], "b": [r, d_out]}}.
    module_name: as `module_names`.
    embeddings: paths of embedding tables (nn.Embed / nnx.Embed layers).
  Returns:
    {PEFT tensor name: float32 array in PEFT's layout}.
  """
  tensors = {}
  for path, name in module_names(adapter, module_name).items():
    factors = adapter[path]
    suffix_a, suffix_b = EMBEDDING_SUFFIXES if path in embeddings else LINEAR_SUFFIXES
    tensors[f"{PREFIX}{name}{suffix_a}"] = np.ascontiguousarray(np.asarray(factors["a"], np.float32).T)
    tensors[f"{PREFIX}{name}{suffix_b}"] = np.ascontiguousarray(np.asarray(factors["b"], np.float32).T)
  return tensors


def _factor_of(name: str) -> tuple[str, str] | None:
  """(module name, "a" | "b") of a PEFT LoRA tensor name, or None."""
  for suffix_a, suffix_b in (LINEAR_SUFFIXES, EMBEDDING_SUFFIXES):
    for suffix, key in ((suffix_a, "a"), (suffix_b, "b")):
      if name.startswith(PREFIX) and name.endswith(suffix):
        return name[len(PREFIX) : -len(suffix)], key
  return None


def from_peft_tensors(
  tensors: Mapping[str, np.ndarray], module_paths: Mapping[str, str] | None = None
) -> dict[str, dict[str, np.ndarray]]:
  """The inverse of `to_peft_tensors`: {path: {"a", "b"}}, each module name mapped to its path by
  `module_paths` ({name: path}; default '.' -> '/'). Raises ValueError on a name outside the
  layout (naming what it is when peft wrote it: DoRA's magnitude, a LoRA bias, a module saved
  whole), a module `module_paths` does not know, or a layer missing one of its factors.

  Args:
    tensors: {PEFT tensor name: array} (an adapter_model.safetensors).
    module_paths: {PEFT module name: Flax path}.
  Returns:
    {Flax path: {"a": [d_in, r], "b": [r, d_out]}}.
  """
  adapter: dict[str, dict[str, np.ndarray]] = {}
  for name, value in tensors.items():
    found = _factor_of(name)
    if found is None:
      raise ValueError(
        f"{name!r} is not a PEFT LoRA tensor ('{PREFIX}<module>.lora_A|lora_B.weight' or "
        f"'.lora_embedding_A|B'){_what_peft_tensor(name)}"
      )
    module, key = found
    if module_paths is None:
      path = module.replace(".", "/")
    elif module in module_paths:
      path = module_paths[module]
    else:
      raise ValueError(
        f"{name!r}: module {module!r} is none of the model's adapted layers "
        f"({', '.join(sorted(module_paths)[:6])}{' ...' if len(module_paths) > 6 else ''})"
      )
    adapter.setdefault(path, {})[key] = np.asarray(value).T
  incomplete = sorted(p for p, f in adapter.items() if set(f) != {"a", "b"})
  if incomplete:
    raise ValueError(f"layers missing lora_A or lora_B: {incomplete}")
  mismatched = {p: (f["a"].shape, f["b"].shape) for p, f in adapter.items() if f["a"].shape[1] != f["b"].shape[0]}
  if mismatched:
    raise ValueError(f"layers whose lora_A and lora_B ranks differ (a [d_in, r], b [r, d_out]): {mismatched}")
  return adapter


def _what_peft_tensor(name: str) -> str:
  for marker, meaning in (
    (".lora_magnitude_vector", "DoRA's magnitude (use_dora), which this loader does not apply"),
    (".lora_B.bias", "a LoRA bias (lora_bias), which this loader does not apply"),
    (".modules_to_save.", "a module saved whole (modules_to_save)"),
    (".trainable_tokens_", "trainable tokens (trainable_token_indices)"),
  ):
    if marker in name:
      return f": it is {meaning}"
  return ""


def without_tied_heads(tensors: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> dict:
  """`tensors` without the factors of heads tied to an adapted embedding table (with peft's
  `ensure_weight_tying`, a tied head's lora_A / lora_B are the table's lora_embedding_B / A,
  transposed), which `lora.apply` adapts through the table itself (`embed.attend`).

  Args:
    tensors: {PEFT tensor name: array}.
    config: the adapter_config.json dict.
  Returns:
    A new dict.
  """
  tensors = dict(tensors)
  if not config.get("ensure_weight_tying"):
    return tensors
  embeddings = {}
  for name in tensors:
    found = _factor_of(name)
    if found and name.endswith(EMBEDDING_SUFFIXES[0]):
      embeddings[found[0]] = (tensors[name], tensors.get(f"{PREFIX}{found[0]}{EMBEDDING_SUFFIXES[1]}"))
  for name in [n for n in tensors if n.endswith(LINEAR_SUFFIXES[0])]:
    head = name[len(PREFIX) : -len(LINEAR_SUFFIXES[0])]
    lora_a, lora_b = tensors[name], tensors.get(f"{PREFIX}{head}{LINEAR_SUFFIXES[1]}")
    for table_a, table_b in embeddings.values():
      if (
        table_b is not None
        and lora_b is not None
        and lora_a.shape == table_b.T.shape
        and lora_b.shape == table_a.T.shape
        and np.array_equal(lora_a, table_b.T)
        and np.array_equal(lora_b, table_a.T)
      ):
        del tensors[name], tensors[f"{PREFIX}{head}{LINEAR_SUFFIXES[1]}"]
        break
  return tensors


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
  r"""peft's per-module lookup in a `rank_pattern` / `alpha_pattern`: the value of the first key
  `k` (in the dict's order) with `re.match(rf"(.*\.)?({k})$", module)`, else `default`.

  Args:
    patterns: {regex key: value}.
    module: the PEFT module name.
    default: the value without a match.
  Returns:
    The module's value.
  """
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def layer_scales(config: Mapping[str, Any], modules: Mapping[str, str]) -> dict[str, float]:
  """{path: s_l}: each module's own LoRA scale, lora_alpha_l / r_l (rsLoRA: / sqrt(r_l)), with
  r_l and lora_alpha_l from `rank_pattern` / `alpha_pattern` (`pattern_value`) or the config's
  r and lora_alpha. `modules`: {path: PEFT module name}.

  Args:
    config: the adapter_config.json dict.
    modules: {path: PEFT module name}.
  Returns:
    {path: s_l}.
  """
  scales = {}
  for path, module in modules.items():
    rank = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    scales[path] = _scale(alpha, rank, config.get("use_rslora", False))
  return scales


def check_config(config: Mapping[str, Any], where: str) -> None:
  """Raises ValueError if `config` (an adapter_config.json dict) is not a LoRA adapter this
  layout can hold (see `UNSUPPORTED_FIELDS`, and `bias` other than "none").

  Args:
    config: the adapter_config.json dict.
    where: the file, for the error.
  """
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{where}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
  used = [f"{field}={config[field]!r}" for field in UNSUPPORTED_FIELDS if config.get(field)]
  if config.get("bias", "none") != "none":
    used.append(f"bias={config['bias']!r}")
  if used:
    raise ValueError(
      f"{where}: {', '.join(used)}: this adapter computes more than (lora_alpha / r) · B A per "
      f"module, which this loader cannot apply; only plain LoRA adapters load"
    )
  for field in ("r", "lora_alpha"):
    if not isinstance(config.get(field), (int, float)) or isinstance(config.get(field), bool) or config[field] <= 0:
      raise ValueError(f"{where}: {field} must be a positive number, got {config.get(field)!r}")


def save_peft(
  directory: str,
  adapter: Mapping[str, Mapping[str, Any]],
  *,
  alpha: float,
  rslora: bool = False,
  base_model_name_or_path: str = "",
  module_name: ModuleName | None = None,
  embeddings: Collection[str] = (),
  tied_heads: Mapping[str, str] | None = None,
  task_type: str | None = None,
) -> None:
  """Writes `adapter` as `adapter_model.safetensors` and `adapter_config.json` in `directory`
  (and its Flax paths in `hyperlora_jax_adapter.json`).

  Args:
    adapter: {path: {"a": [d_in, r_l], "b": [r_l, d_out]}}, applied with one scale s (as
      `lora.apply` does); layers whose rank is not the most common one, r, are written with
      a `rank_pattern` and an `alpha_pattern` (one exact module name each) that keep s.
    alpha: LoRA alpha: s = alpha / r (alpha / sqrt(r) with rslora).
    module_name: Flax path -> the module's name in the reference model (e.g.
      `models.hf.vit_module_name` for a Hugging Face ViT); default: the path with '.'.
    embeddings: paths of embedding tables (`nn.Embed`, `nnx.Embed`), written as PEFT's
      `lora_embedding_A/B` (a linear layer's names would leave PEFT's embedding adapter empty).
    tied_heads: {embedding path: the reference model's name of the output head that reuses
      its table} (e.g. {"embed": "lm_head"} for a decoder with `tie_word_embeddings`):
      `lora.apply` adapts a tied head (`embed.attend`) with the table's factors, which PEFT
      does with `ensure_weight_tying`, written here with the head's factors as peft saves them.
    task_type: PEFT's task type (e.g. "CAUSAL_LM"), None for a bare model.
  """
  from safetensors.numpy import save_file

  names = module_names(adapter, module_name)
  tied_heads = dict(tied_heads or {})
  unknown = sorted(set(embeddings) - set(adapter)) + sorted(set(tied_heads) - set(embeddings))
  if unknown:
    raise ValueError(f"save_peft: {unknown} are not embedding layers of the adapter (embeddings={list(embeddings)})")
  ranks = {path: int(np.shape(f["a"])[-1]) for path, f in adapter.items()}
  for path, rank in ranks.items():
    if rank < 1:
      raise ValueError(f"save_peft: layer {path!r} has rank {rank}; PEFT's ranks are >= 1")
  rank = common_rank(adapter)
  scale = _scale(alpha, rank, rslora)  # The one scale `lora.apply` used on every layer.
  rank_pattern = {re.escape(names[path]): r for path, r in ranks.items() if r != rank}
  alpha_pattern = {
    re.escape(names[path]): scale * (np.sqrt(r) if rslora else r) for path, r in ranks.items() if r != rank
  }
  tensors = to_peft_tensors(adapter, names.get, embeddings)
  for path, head in tied_heads.items():  # peft's tied head: lora_A = the table's B, lora_B = its A.
    suffix_a, suffix_b = LINEAR_SUFFIXES
    tensors[f"{PREFIX}{head}{suffix_a}"] = tensors[f"{PREFIX}{names[path]}{EMBEDDING_SUFFIXES[1]}"].T.copy()
    tensors[f"{PREFIX}{head}{suffix_b}"] = tensors[f"{PREFIX}{names[path]}{EMBEDDING_SUFFIXES[0]}"].T.copy()
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS))
  config = {
    "peft_type": "LORA",
    "r": rank,
    "lora_alpha": alpha,
    "use_rslora": rslora,
    "target_modules": sorted(names.values()),
    "rank_pattern": rank_pattern,
    "alpha_pattern": alpha_pattern,
    "lora_dropout": 0.0,
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
    "task_type": task_type,
    "base_model_name_or_path": base_model_name_or_path,
    "ensure_weight_tying": bool(tied_heads),
  }
  with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(directory, PATHS_FILE), "w") as f:
    json.dump({"module_paths": {name: path for path, name in names.items()}}, f, indent=2)


def load_peft(
  directory: str, *, paths=None, module_name: ModuleName | None = None
) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
  """(adapter {path: {"a", "b"}}, the adapter_config.json dict) from `directory`.

  The module names map back to Flax paths by `paths` + `module_name` (the model's adaptable
  paths and their naming, as given to `save_peft`: what an adapter trained elsewhere needs),
  else by the directory's `hyperlora_jax_adapter.json`, else by '.' -> '/'. With `paths` a
  mapping {path: (d_in, d_out)} (what `lora.find_targets` returns), every factor's shape is
  checked against its layer. Layers with their own rank or alpha (`rank_pattern`,
  `alpha_pattern`) have b rescaled so that one scale, `scale_from_config(config)`, is right
  for all (module docstring).

  Args:
    directory: a PEFT adapter directory (adapter_config.json, adapter_model.safetensors).
    paths: the model's adaptable Flax paths, or {path: (d_in, d_out)} to check shapes.
    module_name: Flax path -> PEFT module name, as given to `save_peft`.
  Returns:
    (adapter {path: {"a": [d_in, r], "b": [r, d_out]}}, the adapter_config.json dict).
  Raises:
    FileNotFoundError: a file is missing; ValueError: the files do not hold a plain LoRA
      adapter (naming the config field or tensor), one for modules that `paths` do not name,
      factors whose shape is not their layer's or whose rank is not the config's.
  """
  from safetensors.numpy import load_file

  config_file = os.path.join(directory, ADAPTER_CONFIG)
  with open(config_file) as f:
    config = json.load(f)
  check_config(config, config_file)
  module_paths, order = None, None
  if paths is not None:
    module_paths = {name: path for path, name in module_names(paths, module_name).items()}
    order = list(paths)
  elif os.path.isfile(os.path.join(directory, PATHS_FILE)):
    with open(os.path.join(directory, PATHS_FILE)) as f:
      module_paths = json.load(f)["module_paths"]
    order = list(module_paths.values())
  elif config.get("hyperlora_jax_module_paths"):  # Written before the paths had their own file.
    order = list(config["hyperlora_jax_module_paths"])
  weights_file = os.path.join(directory, ADAPTER_WEIGHTS)
  tensors = without_tied_heads(load_file(weights_file), config)
  adapter = from_peft_tensors(tensors, module_paths)
  modules = (
    {path: name for name, path in module_paths.items()}
    if module_paths is not None
    else {path: path.replace("/", ".") for path in adapter}
  )
  _check_factor_shapes(adapter, config, modules, paths if isinstance(paths, Mapping) else None, weights_file)
  adapter = _to_one_scale(adapter, config, modules)
  if order is None:
    return adapter, config
  return {p: adapter[p] for p in order if p in adapter}, config


def _check_factor_shapes(
  adapter: dict, config: Mapping[str, Any], modules: Mapping[str, str], shapes: Mapping[str, Any] | None, where: str
) -> None:
  """Each layer's rank is the config's (`rank_pattern` included) and, with `shapes` {path:
  (d_in, d_out)}, its a [d_in, r] and b [r, d_out] fit its layer; raises ValueError naming it."""
  for path, factors in adapter.items():
    module = modules.get(path, path)
    rank = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    got = (tuple(factors["a"].shape), tuple(factors["b"].shape))
    if got[0][1] != rank:
      raise ValueError(
        f"{where}: module {module!r} has rank {got[0][1]} (lora_A {got[0][::-1]}), but "
        f"adapter_config.json gives it r={rank} (r / rank_pattern)"
      )
    if shapes is not None and path in shapes:
      d_in, d_out = (int(d) for d in shapes[path])
      if got[0][0] != d_in or got[1][1] != d_out:
        raise ValueError(
          f"{where}: module {module!r} is [d_in, d_out] = [{got[0][0]}, {got[1][1]}] in the "
          f"adapter (lora_A {got[0][::-1]}, lora_B {got[1][::-1]}), but the model's layer "
          f"{path!r} is [{d_in}, {d_out}]: an adapter of another model"
        )


def _to_one_scale(adapter: dict, config: Mapping[str, Any], modules: Mapping[str, str]) -> dict:
  """Every layer's b times s_l / s (s = `scale_from_config`), so one scale serves all."""
  scale = scale_from_config(config)
  scales = layer_scales(config, {path: modules.get(path, path) for path in adapter})
  return {
    path: {
      "a": f["a"],
      "b": f["b"] if scales[path] == scale else (f["b"] * (scales[path] / scale)).astype(f["b"].dtype),
    }
    for path, f in adapter.items()
  }


def scale_from_config(config: Mapping[str, Any]) -> float:
  """s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)) from an adapter_config.json dict: the
  scale of every layer of an adapter `load_peft` returns.

  Args:
    config: the adapter_config.json dict.
  Returns:
    s, a float.
  """
  return _scale(config["lora_alpha"], config["r"], config.get("use_rslora", False))


def alpha_for_scale(adapter: Mapping[str, Mapping[str, Any]], scale: float, rslora: bool = False) -> float:
  """The `alpha` with which `save_peft` writes `adapter` for the scale s that `lora.apply` used:
  s r (rsLoRA: s sqrt(r)), r the adapter's most common rank (`save_peft`'s r).

  Args:
    adapter: {path: {"a": [d_in, r_l], "b": [r_l, d_out]}}.
    scale: s.
    rslora: write rank-stabilized scaling.
  Returns:
    lora_alpha, a float.
  """
  rank = common_rank(adapter)
  return float(scale * (np.sqrt(rank) if rslora else rank))


def common_rank(adapter: Mapping[str, Mapping[str, Any]]) -> int:
  """The rank most of `adapter`'s layers have: `save_peft`'s r (the others get a `rank_pattern`).

  Args:
    adapter: {path: {"a": [d_in, r_l], "b": [r_l, d_out]}}.
  Returns:
    r.
  """
  ranks = [int(np.shape(f["a"])[-1]) for f in adapter.values()]
  return max(set(ranks), key=ranks.count)


def fold_base_delta(
  adapter: Mapping[str, Mapping[str, Any]],
  base_delta: Mapping[str, Any],
  scale: float,
  *,
  max_rank: int = 0,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
  """An adapter that alone gives the update of `adapter` on weights carrying `base_delta`, the
  full-rank residuals FedEx-LoRA and FLoRA merge into the frozen weights, which a PEFT adapter
  cannot hold: per layer, s a' b' = delta + s a b, from the SVD of the right side (in float64)
  at its numerical rank (singular values above max(d_in, d_out) eps_float32 times the largest),
  or at most `max_rank`. Layers without a residual are returned as they are.

  Args:
    adapter: {path: {"a": [d_in, r], "b": [r, d_out]}} (`lora.apply`'s layout).
    base_delta: {path: [d_in, d_out]} (`ServerState.base_delta`; {} for other methods).
    scale: s, the scale `lora.apply` uses on every layer.
    max_rank: the most ranks a folded layer keeps (0: its numerical rank, exact).
  Returns:
    (adapter {path: {"a": [d_in, r'], "b": [r', d_out]}} in the adapter's dtype, {path folded:
    ||kept - (delta + s a b)||_F / ||delta + s a b||_F}, 0 up to rounding unless truncated).
  Raises:
    ValueError: a residual's shape is not its layer's [d_in, d_out], or max_rank < 0.
  """
  if max_rank < 0:
    raise ValueError(f"fold_base_delta: max_rank={max_rank} must be >= 0 (0: exact)")
  folded = {path: {k: np.asarray(v) for k, v in f.items()} for path, f in adapter.items()}
  errors = {}
  for path, delta in base_delta.items():
    delta = np.asarray(delta, np.float64)
    factors = folded.get(path)
    if factors is not None:
      shape = (np.shape(factors["a"])[0], np.shape(factors["b"])[-1])
      if delta.shape != shape:
        raise ValueError(f"fold_base_delta: the residual of {path!r} is {delta.shape}, its layer's update {shape}")
      delta = delta + scale * (factors["a"].astype(np.float64) @ factors["b"].astype(np.float64))
    dtype = factors["a"].dtype if factors is not None else np.float32
    u, sigma, vt = np.linalg.svd(delta, full_matrices=False)
    tolerance = sigma[0] * max(delta.shape) * np.finfo(np.float32).eps if sigma.size else 0.0
    rank = max(1, int(np.sum(sigma > tolerance)))
    rank = min(rank, max_rank) if max_rank else rank
    root = np.sqrt(sigma[:rank])
    a, b = u[:, :rank] * root, (root[:, None] * vt[:rank]) / scale
    folded[path] = {"a": a.astype(dtype), "b": b.astype(dtype)}
    norm = np.linalg.norm(delta)
    errors[path] = float(np.linalg.norm(scale * (a @ b) - delta) / norm) if norm else 0.0
  return folded, errors


def _scale(alpha: float, rank: int, rslora: bool) -> float:
  """alpha / r, or alpha / sqrt(r) for rsLoRA (`lora.lora_scale`, without importing it)."""
  return alpha / (np.sqrt(rank) if rslora else rank)
