"""Padding and tokens per second of a text run's local steps, records one a row against packed rows.

A records file (or the embedded `stdlib_docs` records) is tokenized by the embedded decoder's
tokenizer at each `--max_len`, as a text run does (`text.encode_instructions`; records left with
no response token dropped); each group's records (Dolly's `category`: one client each, as the
default partition makes them) are packed into rows of max_len tokens (`text.packing_plan`,
best-fit decreasing, `text.pack_examples`), as `data.packing=True` packs them. Then one epoch
over every record is timed both ways with the library's client update (LoRA r=4 on q/v, Adam,
the loss on the response tokens) on the embedded decoder's architecture (random weights: the
time does not depend on them): steps of `--batch_size` rows, records one a row or packed rows,
interleaved (`timing.interleaved_times`), best of `--repeats`, on `--threads` threads.

Printed and written (JSON) per max_len: records, rows, the padding fraction of the slots each way,
the real tokens (every slot holding a token), seconds per epoch and real tokens per second each
way, and their ratio beside the ratio of real tokens per slot (what packing can save).

  python -m benchmarks.packing --data stdlib_docs --max_len 176,256,512 --out benchmarks/packing_cpu.json
  python -m benchmarks.packing --pooled --max_len 512 --out benchmarks/packing_pooled_cpu.json
  python -m benchmarks.packing --copies 8 --max_len 512 --repeats 2 --out benchmarks/packing_copies_cpu.json
"""

from __future__ import annotations

import json
import platform
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.timing import confine_threads, define_threads_flag, interleaved_times
from benchmarks.workloads import text_client_update_fn

_DATA = flags.DEFINE_string("data", "stdlib_docs", "A Dolly / Alpaca .jsonl, .json or .parquet file, or stdlib_docs.")
_LAYOUT = flags.DEFINE_string("layout", "dolly", "The records' layout (hyperlora_jax.text.LAYOUTS).")
_MAX_LEN = flags.DEFINE_string("max_len", "176,512", "Comma-separated data.max_len values.")
_POOLED = flags.DEFINE_bool("pooled", False, "Pack all records together (one client) instead of per group.")
_COPIES = flags.DEFINE_integer(
  "copies", 1, "Each record this many times: clients of a Dolly-sized file (its categories hold 700-3,700 records)."
)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per local step (configs/instruction_tuning.py's).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed epochs each way, interleaved (the best is reported).")
_THREADS = define_threads_flag()
_OUT = flags.DEFINE_string("out", "", "JSON file for the results.")


def embedded_tokenizer():
  """The embedded decoder's tokenizer (pretrained and cached on first use, as a text run does)."""
  from configs import instruction_tuning
  from experiments.runner import backbone as backbone_lib
  from experiments.runner.settings import backbone_settings

  config = instruction_tuning.get_config()
  return backbone_lib.decoder_checkpoint(backbone_settings(config), print).require_tokenizer()


def records_of(name: str) -> list[dict]:
  from experiments.runner.data import instructions

  return list(instructions.load_records(name))


def encoded_groups(
  tokenizer, records: list[dict], max_len: int, layout: str, pooled: bool = False
) -> list[dict[str, np.ndarray]]:
  """Per group (`text.LAYOUTS[layout]["group"]`; one group if none or `pooled`), its records
  encoded at `max_len` (those with no response token left dropped)."""
  from hyperlora_jax import text

  field = None if pooled else text.LAYOUTS[layout]["group"]
  groups: dict[str, list[dict]] = defaultdict(list)
  for record in records:
    groups[str(record.get(field, "")) if field else ""].append(record)
  encoded = []
  for name in sorted(groups):
    tokens = text.encode_instructions(tokenizer, groups[name], max_len, layout)
    keep = tokens["loss_mask"].sum(axis=1) > 0
    encoded.append({k: tokens[k][keep] for k in ("input_ids", "attention_mask", "loss_mask")})
  return encoded


def epoch_block(rows: dict[str, np.ndarray], batch: int) -> dict[str, jax.Array]:
  """rows [N, T] as one client's epoch [S, B, T] (S = ceil(N / B); the last step's missing rows
  masked), with "mask" [S, B]."""
  n, t = rows["input_ids"].shape
  steps = -(-n // batch)
  pad = steps * batch - n
  block = {k: np.concatenate([v, np.zeros((pad, t), v.dtype)]).reshape(steps, batch, t) for k, v in rows.items()}
  block["mask"] = (np.arange(steps * batch) < n).astype(np.float32).reshape(steps, batch)
  return {k: jnp.asarray(v) for k, v in block.items()}


def measure(tokenizer, records, max_len: int, layout: str, batch: int, repeats: int, pooled: bool) -> dict:
  """The figures of one max_len (module docstring)."""
  from hyperlora_jax import text

  groups = encoded_groups(tokenizer, records, max_len, layout, pooled)
  unpacked = {k: np.concatenate([g[k] for g in groups]) for k in groups[0]}
  packed_groups = [
    text.pack_examples(g, text.packing_plan(text.example_lengths(g["attention_mask"]), max_len), tokenizer.pad_id)
    for g in groups
  ]
  packed = {k: np.concatenate([g[k] for g in packed_groups]) for k in packed_groups[0]}
  one_client, frozen, trainable, _, _ = text_client_update_fn("tiny")
  step = jax.jit(one_client)
  blocks = {"records one a row": epoch_block(unpacked, batch), "packed rows": epoch_block(packed, batch)}
  ways = {name: (lambda b=b: jax.block_until_ready(step(frozen, trainable, b))) for name, b in blocks.items()}
  times = interleaved_times(ways, repeats)
  real = int(np.sum(unpacked["attention_mask"] > 0))
  assert real == int(np.sum(packed["attention_mask"] > 0))  # The same tokens either way.
  best = {name: min(t) for name, t in times.items() if t}
  return {
    "max_len": max_len,
    "groups": len(groups),
    "records": int(len(unpacked["input_ids"])),
    "rows": int(len(packed["input_ids"])),
    "padding": {
      "records one a row": text.padding_fraction(unpacked["attention_mask"]),
      "packed rows": text.padding_fraction(packed["attention_mask"]),
    },
    "real_tokens": real,
    "steps": {name: int(b["mask"].shape[0]) for name, b in blocks.items()},
    "seconds_per_epoch": best,
    "real_tokens_per_second": {name: real / s for name, s in best.items()},
    "speedup": best["records one a row"] / best["packed rows"],
    "slots_ratio": len(unpacked["input_ids"]) / len(packed["input_ids"]),
    "times": times,
  }


def main(_):
  threads = confine_threads(_THREADS.value)
  tokenizer = embedded_tokenizer()
  records = [r for r in records_of(_DATA.value) for _ in range(_COPIES.value)]
  results = []
  for max_len in (int(x) for x in _MAX_LEN.value.split(",")):
    result = measure(tokenizer, records, max_len, _LAYOUT.value, _BATCH.value, _REPEATS.value, _POOLED.value)
    results.append(result)
    pad = result["padding"]
    rate = result["real_tokens_per_second"]
    print(
      f"max_len {max_len}: {result['records']} records in {result['groups']} groups -> {result['rows']} packed rows; "
      f"padding {pad['records one a row']:.1%} -> {pad['packed rows']:.1%} of the slots; "
      f"real tokens/s {rate['records one a row']:.0f} -> {rate['packed rows']:.0f} "
      f"(x{result['speedup']:.2f}; slots x{result['slots_ratio']:.2f} fewer)"
    )
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(
        {
          "data": _DATA.value,
          "pooled": _POOLED.value,
          "copies": _COPIES.value,
          "batch_size": _BATCH.value,
          "repeats": _REPEATS.value,
          "threads": threads,
          "device": jax.devices()[0].device_kind,
          "jax": jax.__version__,
          "machine": platform.processor() or platform.machine(),
          "command": "python -m benchmarks.packing "
          + " ".join(
            f"--{k}={v}"
            for k, v in (
              ("data", _DATA.value),
              ("max_len", _MAX_LEN.value),
              ("pooled", _POOLED.value),
              ("copies", _COPIES.value),
              ("threads", threads),
            )
          ),
          "results": results,
        },
        f,
        indent=2,
      )


if __name__ == "__main__":
  app.run(main)
