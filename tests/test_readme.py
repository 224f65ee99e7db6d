"""The README's functional-API example runs exactly as written."""
import os
import re

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(marker: str) -> str:
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  match = re.search(rf"<!-- example:{marker} -->\s*```python\n(.*?)```", text, re.S)
  assert match, f"README has no example '{marker}'"
  return match.group(1)


def test_functional_api_example_runs():
  namespace = {}
  exec(compile(_example("functional-api"), "README.md", "exec"), namespace)
  grads, adapter = namespace["grads"], namespace["adapter"]
  assert set(grads) == {"hidden", "out"}
  assert grads["hidden"]["a"].shape == (4, 16, 4) and grads["out"]["b"].shape == (4, 4, 10)
  # b starts at 0 so the output equals the base model, but its gradient is non-zero.
  assert float(jnp.abs(grads["out"]["b"]).max()) > 0
  base = namespace["model"].apply(namespace["params"], namespace["x"])
  lora_out = namespace["lora"].apply(namespace["model"], namespace["params"], adapter,
                                     namespace["x"], scale=namespace["scale"])
  assert jnp.array_equal(base, lora_out)
