"""PyTorch baselines for the speed benchmark: the same round written the way PyTorch users would.

Optional (`pip install -e .[bench]`); `available()` says whether torch imports, and why not.

The model mirrors the JAX benchmark's ViT (patch conv, class token, position table, pre-LN
blocks with separate query/key/value/out projections, GELU MLP, final LayerNorm, head), with
LoRA (rank r, scale s) on the attention's query and value and a trainable head; the backbone is
frozen. Weights are random: speed does not depend on them. It runs on CUDA when torch sees a
GPU (float32 with TF32 matmuls, as JAX's default precision runs float32 there), else on the CPU
with as many threads as XLA:CPU uses (`use_cpu_threads`: the CPUs this process may run on). Two ways to run C clients x S local Adam steps:

  loop:  for each client, fresh LoRA + head tensors and `torch.optim.Adam`, S forward/backward/
         step iterations (what PEFT-based federated repositories do per client);
  vmap:  clients in chunks; per chunk, `torch.func.vmap(torch.func.grad(loss))` over the
         chunk's stacked LoRA + head, and a functional Adam on the stacked tensors.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable


def available() -> tuple[bool, str]:
  """(whether torch imports, why not)."""
  try:
    import torch  # noqa: F401
  except ImportError as e:
    return False, f"torch is not installed ({e}); install the optional extra: pip install -e .[bench]"
  return True, ""


def use_cpu_threads(torch) -> int:
  """Sets PyTorch's intra-op threads to the CPUs this process may run on, the count XLA:CPU sizes
  its thread pool by (`benchmarks.timing.confine_threads` sets it for both), so that neither
  framework has more cores than the other; returns it."""
  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  return threads


def device_name() -> str:
  """Where `round_fn`'s round runs: 'cuda' when torch sees a GPU, else 'cpu'."""
  import torch

  return "cuda" if torch.cuda.is_available() else "cpu"


def _frozen(torch, width: int, depth: int, patch: int, image_size: int, mlp_ratio: float, seed: int = 0) -> dict:
  gen = torch.Generator().manual_seed(seed)
  normal = lambda *shape: 0.02 * torch.randn(*shape, generator=gen)
  hidden, tokens = int(mlp_ratio * width), (image_size // patch) ** 2 + 1
  frozen = {
    "patch_w": normal(width, 3, patch, patch),
    "patch_b": torch.zeros(width),
    "cls": torch.zeros(1, 1, width),
    "pos": normal(1, tokens, width),
    "norm_w": torch.ones(width),
    "norm_b": torch.zeros(width),
  }
  for i in range(depth):
    for name, (d_in, d_out) in {
      "query": (width, width),
      "key": (width, width),
      "value": (width, width),
      "out": (width, width),
      "fc1": (width, hidden),
      "fc2": (hidden, width),
    }.items():
      frozen[f"{i}.{name}.w"], frozen[f"{i}.{name}.b"] = normal(d_out, d_in), torch.zeros(d_out)
    for norm in ("norm1", "norm2"):
      frozen[f"{i}.{norm}.w"], frozen[f"{i}.{norm}.b"] = torch.ones(width), torch.zeros(width)
  return frozen


def _trainable(torch, width: int, depth: int, rank: int, classes: int, seed: int = 1) -> dict:
  gen = torch.Generator().manual_seed(seed)
  bound = 1.0 / math.sqrt(width)
  out = {"head_w": torch.zeros(classes, width), "head_b": torch.zeros(classes)}
  for i in range(depth):
    for name in ("query", "value"):
      out[f"{i}.{name}.a"] = (torch.rand(width, rank, generator=gen) * 2 - 1) * bound
      out[f"{i}.{name}.b"] = torch.zeros(rank, width)
  return out


def _forward(torch, frozen: dict, trainable: dict, images, *, depth: int, heads: int, patch: int, scale: float):
  """images uint8 [B, H, W, 3] -> logits [B, classes]."""
  F = torch.nn.functional
  x = images.float() / 127.5 - 1.0
  x = F.conv2d(x.permute(0, 3, 1, 2), frozen["patch_w"], frozen["patch_b"], stride=patch)
  x = x.flatten(2).transpose(1, 2)
  x = torch.cat([frozen["cls"].expand(x.shape[0], -1, -1), x], 1) + frozen["pos"]
  batch, tokens, width = x.shape
  head_dim = width // heads
  for i in range(depth):
    h = F.layer_norm(x, (width,), frozen[f"{i}.norm1.w"], frozen[f"{i}.norm1.b"])
    proj = {}
    for name in ("query", "key", "value"):
      proj[name] = F.linear(h, frozen[f"{i}.{name}.w"], frozen[f"{i}.{name}.b"])
      if f"{i}.{name}.a" in trainable:
        proj[name] = proj[name] + scale * (h @ trainable[f"{i}.{name}.a"]) @ trainable[f"{i}.{name}.b"]
    q, k, v = (proj[n].reshape(batch, tokens, heads, head_dim).transpose(1, 2) for n in ("query", "key", "value"))
    attended = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), -1) @ v
    x = x + F.linear(attended.transpose(1, 2).reshape(batch, tokens, width), frozen[f"{i}.out.w"], frozen[f"{i}.out.b"])
    h = F.layer_norm(x, (width,), frozen[f"{i}.norm2.w"], frozen[f"{i}.norm2.b"])
    x = x + F.linear(
      F.gelu(F.linear(h, frozen[f"{i}.fc1.w"], frozen[f"{i}.fc1.b"])), frozen[f"{i}.fc2.w"], frozen[f"{i}.fc2.b"]
    )
  x = F.layer_norm(x, (width,), frozen["norm_w"], frozen["norm_b"])
  return F.linear(x[:, 0], trainable["head_w"], trainable["head_b"])


def round_fn(
  images,
  labels,
  *,
  width: int,
  depth: int,
  heads: int,
  patch: int,
  mlp_ratio: float,
  rank: int,
  scale: float,
  learning_rate: float,
  way: str,
  chunk: int = 16,
) -> Callable[[], None]:
  """`run()`: one round, C clients x S Adam steps ("loop" or "vmap" in chunks), waiting for
  CUDA's kernels; time it with `benchmarks.timing.interleaved_times` beside the JAX ways.

  Args:
    images: uint8 NumPy [C, S, B, H, W, 3]; labels: int [C, S, B].
  """
  import torch
  from torch.func import grad, vmap

  device = device_name()
  if device == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
  else:
    use_cpu_threads(torch)
  num, steps = images.shape[:2]
  to_device = lambda tree: {k: v.to(device) for k, v in tree.items()}
  frozen = to_device(_frozen(torch, width, depth, patch, images.shape[3], mlp_ratio))
  init = to_device(_trainable(torch, width, depth, rank, 10))
  images_t, labels_t = torch.from_numpy(images).to(device), torch.from_numpy(labels).long().to(device)
  kw = {"depth": depth, "heads": heads, "patch": patch, "scale": scale}
  loss = lambda t, x, y: torch.nn.functional.cross_entropy(_forward(torch, frozen, t, x, **kw), y)

  def loop():
    for c in range(num):
      trainable = {k: v.clone().requires_grad_(True) for k, v in init.items()}
      optimizer = torch.optim.Adam(trainable.values(), lr=learning_rate)
      for s in range(steps):
        optimizer.zero_grad()
        loss(trainable, images_t[c, s], labels_t[c, s]).backward()
        optimizer.step()

  per_client_grad = vmap(grad(loss), in_dims=(0, 0, 0))

  vmapped = lambda: vmapped_adam(torch, per_client_grad, init, images_t, labels_t, chunk, learning_rate)

  return synchronized(torch, {"loop": loop, "vmap": vmapped}[way])


def vmapped_adam(torch, per_client_grad, init: dict, inputs, labels, chunk: int, learning_rate: float) -> None:
  """C clients x S Adam steps in chunks of `chunk` clients: per chunk, `init` stacked per
  client and `per_client_grad(stacked, inputs [k, ...], labels [k, ...])` (a torch.func.vmap of
  grad) followed by a functional Adam on the stacked tensors. inputs, labels: [C, S, ...]."""
  b1, b2, eps = 0.9, 0.999, 1e-8
  num, steps = inputs.shape[:2]
  for start in range(0, num, chunk):
    size = min(chunk, num - start)
    trainable = {k: v.expand(size, *v.shape).clone() for k, v in init.items()}
    m = {k: torch.zeros_like(v) for k, v in trainable.items()}
    v2 = {k: torch.zeros_like(v) for k, v in trainable.items()}
    for s in range(steps):
      grads = per_client_grad(trainable, inputs[start : start + size, s], labels[start : start + size, s])
      t = s + 1
      for k in init:
        m[k].mul_(b1).add_(grads[k], alpha=1 - b1)
        v2[k].mul_(b2).addcmul_(grads[k], grads[k], value=1 - b2)
        denom = (v2[k] / (1 - b2**t)).sqrt_().add_(eps)
        trainable[k] = trainable[k] - learning_rate * (m[k] / (1 - b1**t)) / denom


def synchronized(torch, way_fn: Callable[[], None]) -> Callable[[], None]:
  """`way_fn` followed by a wait for CUDA's asynchronous kernels (nothing on the CPU)."""

  def run():
    way_fn()
    if torch.cuda.is_available():
      torch.cuda.synchronize()  # Kernels run asynchronously: wait for the last one.

  return run
