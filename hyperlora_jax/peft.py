"""Adapters out and in: Hugging Face PEFT's on-disk LoRA layout.

    save_peft(directory, adapter, alpha=8.0)      # adapter_model.safetensors + adapter_config.json
    adapter, config = load_peft(directory)
    # A model loaded from Hugging Face: its own module names, so `peft` attaches the adapter.
    save_peft(directory, adapter, alpha=8.0, module_name=models.hf.vit_module_name)
    adapter, config = load_peft(directory, paths=list(adapter), module_name=models.hf.vit_module_name)

Layout (PEFT's `LoraModel` for a linear layer; our kernel-layout factors transposed):
  base_model.model.<module name>.lora_A.weight  [r, d_in]   = aᵀ
  base_model.model.<module name>.lora_B.weight  [d_out, r]  = bᵀ
so PEFT's `ΔW = (lora_alpha / r) · lora_B @ lora_A` [d_out, d_in] is `(s a b)ᵀ`, the transpose
of the Flax-kernel update `lora.merge` adds. For layers other than `nn.Dense`, d_in and d_out
are the flattened sizes of `hyperlora_jax.lora`'s layouts (e.g. a Conv's window × c_in).
The module name is `module_name(path)` (default: the Flax path with '.' for '/'), and
adapter_config.json's `target_modules` are those exact names, so no other module with the same
last name is hooked; it holds only fields of peft's `LoraConfig`. The Flax paths are kept in a
file of their own (`hyperlora_jax_adapter.json`), which `load_peft` reads when present.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import numpy as np

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PATHS_FILE = "hyperlora_jax_adapter.json"  # {"module_paths": {module name: Flax path}}
PREFIX = "base_model.model."
ModuleName = Callable[[str], "str | None"]


def default_module_name(path: str) -> str:
  """The Flax module path with '.' for '/' (a model of this project's own)."""
  parts = path.split("/")
  if any("." in p or not p for p in parts):
    raise ValueError(f"module path {path!r}: PEFT names join path parts with '.', so no part may "
                     f"contain '.' or be empty")
  return ".".join(parts)


def module_names(paths, module_name: ModuleName | None = None) -> dict[str, str]:
  """{Flax path: PEFT module name} (raises ValueError for a path the naming does not know)."""
  name_of = module_name or default_module_name
  names = {}
  for path in paths:
    name = name_of(path)
    if not name:
      raise ValueError(f"module path {path!r} has no module in the reference model (module_name gave {name!r})")
    names[path] = name
  return names


def to_peft_tensors(adapter: Mapping[str, Mapping[str, Any]],
                    module_name: ModuleName | None = None) -> dict[str, np.ndarray]:
  """{path: {"a": [d_in, r], "b": [r, d_out]}} -> {PEFT name: array} (see the module docstring)."""
  tensors = {}
  for path, name in module_names(adapter, module_name).items():
    factors = adapter[path]
    tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(factors["a"], np.float32).T)
    tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(factors["b"], np.float32).T)
  return tensors


def from_peft_tensors(tensors: Mapping[str, np.ndarray],
                      module_paths: Mapping[str, str] | None = None) -> dict[str, dict[str, np.ndarray]]:
  """The inverse of `to_peft_tensors`: {path: {"a", "b"}}, each module name mapped to its path by
  `module_paths` ({name: path}; default '.' -> '/'). Raises ValueError on a name outside the
  layout, a module `module_paths` does not know, or a layer missing one of its factors."""
  adapter: dict[str, dict[str, np.ndarray]] = {}
  for name, value in tensors.items():
    for suffix, key in ((".lora_A.weight", "a"), (".lora_B.weight", "b")):
      if name.startswith(PREFIX) and name.endswith(suffix):
        module = name[len(PREFIX):-len(suffix)]
        if module_paths is None:
          path = module.replace(".", "/")
        elif module in module_paths:
          path = module_paths[module]
        else:
          raise ValueError(f"{name!r}: module {module!r} is none of the model's adapted layers "
                           f"({', '.join(sorted(module_paths)[:6])}{' ...' if len(module_paths) > 6 else ''})")
        adapter.setdefault(path, {})[key] = np.asarray(value).T
        break
    else:
      raise ValueError(f"{name!r} is not a PEFT LoRA tensor ('{PREFIX}<module>.lora_A|lora_B.weight')")
  incomplete = sorted(p for p, f in adapter.items() if set(f) != {"a", "b"})
  if incomplete:
    raise ValueError(f"layers missing lora_A or lora_B: {incomplete}")
  return adapter


def save_peft(directory: str, adapter: Mapping[str, Mapping[str, Any]], *, alpha: float,
              rslora: bool = False, base_model_name_or_path: str = "",
              module_name: ModuleName | None = None) -> None:
  """Writes `adapter` as `adapter_model.safetensors` and `adapter_config.json` in `directory`
  (and its Flax paths in `hyperlora_jax_adapter.json`).

  Args:
    adapter: {path: {"a": [d_in, r], "b": [r, d_out]}}, one rank r for every layer.
    alpha: LoRA alpha (scale s = alpha / r, or alpha / sqrt(r) with rslora).
    module_name: Flax path -> the module's name in the reference model (e.g.
      `models.hf.vit_module_name` for a Hugging Face ViT); default: the path with '.'.
  """
  from safetensors.numpy import save_file
  ranks = {np.shape(f["a"])[-1] for f in adapter.values()}
  if len(ranks) != 1:
    raise ValueError(f"PEFT's config holds one rank; the adapter has ranks {sorted(ranks)}")
  names = module_names(adapter, module_name)
  os.makedirs(directory, exist_ok=True)
  save_file(to_peft_tensors(adapter, names.get), os.path.join(directory, ADAPTER_WEIGHTS))  # Named once.
  config = {"peft_type": "LORA", "r": ranks.pop(), "lora_alpha": alpha, "use_rslora": rslora,
            "target_modules": sorted(names.values()), "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "task_type": None,
            "base_model_name_or_path": base_model_name_or_path}
  with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(directory, PATHS_FILE), "w") as f:
    json.dump({"module_paths": {name: path for path, name in names.items()}}, f, indent=2)


def load_peft(directory: str, *, paths=None,
              module_name: ModuleName | None = None) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
  """(adapter {path: {"a", "b"}}, the adapter_config.json dict) from `directory`.

  The module names map back to Flax paths by `paths` + `module_name` (the model's adaptable
  paths and their naming, as given to `save_peft`: what an adapter trained elsewhere needs),
  else by the directory's `hyperlora_jax_adapter.json`, else by '.' -> '/'.

  Raises:
    FileNotFoundError: a file is missing; ValueError: the files do not hold a LoRA adapter, or
      one for modules that `paths` do not name.
  """
  from safetensors.numpy import load_file
  with open(os.path.join(directory, ADAPTER_CONFIG)) as f:
    config = json.load(f)
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{directory}/{ADAPTER_CONFIG}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
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
  adapter = from_peft_tensors(load_file(os.path.join(directory, ADAPTER_WEIGHTS)), module_paths)
  if order is None:
    return adapter, config
  return {p: adapter[p] for p in order if p in adapter}, config


def scale_from_config(config: Mapping[str, Any]) -> float:
  """s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)) from an adapter_config.json dict."""
  rank = config["r"]
  return config["lora_alpha"] / (np.sqrt(rank) if config.get("use_rslora") else rank)
