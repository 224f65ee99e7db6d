"""Adapters out and in: Hugging Face PEFT's on-disk LoRA layout.

    save_peft(directory, adapter, alpha=8.0)      # adapter_model.safetensors + adapter_config.json
    adapter, config = load_peft(directory)

Layout (PEFT's `LoraModel` for a linear layer; our kernel-layout factors transposed):
  base_model.model.<module path with '.'>.lora_A.weight  [r, d_in]   = aᵀ
  base_model.model.<module path with '.'>.lora_B.weight  [d_out, r]  = bᵀ
so PEFT's `ΔW = (lora_alpha / r) · lora_B @ lora_A` [d_out, d_in] is `(s a b)ᵀ`, the transpose
of the Flax-kernel update `lora.merge` adds. For layers other than `nn.Dense`, d_in and d_out
are the flattened sizes of `hyperlora_jax.lora`'s layouts (e.g. a Conv's window × c_in).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."


def _peft_name(path: str) -> str:
  parts = path.split("/")
  if any("." in p or not p for p in parts):
    raise ValueError(f"module path {path!r}: PEFT names join path parts with '.', so no part may "
                     f"contain '.' or be empty")
  return PREFIX + ".".join(parts)


def to_peft_tensors(adapter: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """{path: {"a": [d_in, r], "b": [r, d_out]}} -> {PEFT name: array} (see the module docstring)."""
  tensors = {}
  for path, factors in adapter.items():
    name = _peft_name(path)
    tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(factors["a"], np.float32).T)
    tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(factors["b"], np.float32).T)
  return tensors


def from_peft_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """The inverse of `to_peft_tensors`. Raises ValueError on a name outside the layout or a
  layer missing one of its factors."""
  adapter: dict[str, dict[str, np.ndarray]] = {}
  for name, value in tensors.items():
    for suffix, key in ((".lora_A.weight", "a"), (".lora_B.weight", "b")):
      if name.startswith(PREFIX) and name.endswith(suffix):
        path = name[len(PREFIX):-len(suffix)].replace(".", "/")
        adapter.setdefault(path, {})[key] = np.asarray(value).T
        break
    else:
      raise ValueError(f"{name!r} is not a PEFT LoRA tensor ('{PREFIX}<module>.lora_A|lora_B.weight')")
  incomplete = sorted(p for p, f in adapter.items() if set(f) != {"a", "b"})
  if incomplete:
    raise ValueError(f"layers missing lora_A or lora_B: {incomplete}")
  return adapter


def save_peft(directory: str, adapter: Mapping[str, Mapping[str, Any]], *, alpha: float,
              rslora: bool = False, base_model_name_or_path: str = "") -> None:
  """Writes `adapter` as `adapter_model.safetensors` and `adapter_config.json` in `directory`.

  Args:
    adapter: {path: {"a": [d_in, r], "b": [r, d_out]}}, one rank r for every layer.
    alpha: LoRA alpha (scale s = alpha / r, or alpha / sqrt(r) with rslora).
  """
  from safetensors.numpy import save_file
  ranks = {np.shape(f["a"])[-1] for f in adapter.values()}
  if len(ranks) != 1:
    raise ValueError(f"PEFT's config holds one rank; the adapter has ranks {sorted(ranks)}")
  os.makedirs(directory, exist_ok=True)
  save_file(to_peft_tensors(adapter), os.path.join(directory, ADAPTER_WEIGHTS))
  config = {"peft_type": "LORA", "r": ranks.pop(), "lora_alpha": alpha, "use_rslora": rslora,
            "target_modules": sorted({p.split("/")[-1] for p in adapter}), "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "task_type": None,
            "base_model_name_or_path": base_model_name_or_path,
            "hyperlora_jax_module_paths": list(adapter)}
  with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)


def load_peft(directory: str) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
  """(adapter {path: {"a", "b"}}, the adapter_config.json dict) from `directory`.

  Raises:
    FileNotFoundError: a file is missing; ValueError: the files do not hold a LoRA adapter.
  """
  from safetensors.numpy import load_file
  with open(os.path.join(directory, ADAPTER_CONFIG)) as f:
    config = json.load(f)
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{directory}/{ADAPTER_CONFIG}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
  adapter = from_peft_tensors(load_file(os.path.join(directory, ADAPTER_WEIGHTS)))
  order = config.get("hyperlora_jax_module_paths") or list(adapter)
  return {p: adapter[p] for p in order if p in adapter}, config


def scale_from_config(config: Mapping[str, Any]) -> float:
  """s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)) from an adapter_config.json dict."""
  rank = config["r"]
  return config["lora_alpha"] / (np.sqrt(rank) if config.get("use_rslora") else rank)
