"""Hugging Face + PEFT baselines for the speed benchmark: the round as a `transformers` + `peft`
user writes it.

Optional (`pip install -e .[bench]`: torch, transformers, peft); `available()` says whether they
import, and why not. Unlike `torch_baselines` (a hand-written ViT), the model here is the
reference implementation itself: `transformers.ViTForImageClassification` or `CLIPModel` built
from a config of the benchmark's architecture (random weights: speed does not depend on them;
transformers' default attention, SDPA), wrapped by `peft.get_peft_model` with LoRA (rank r,
`lora_alpha`) on the attention's query and value (both towers of a CLIP) and, for the ViT, the
classifier trained too (`modules_to_save`). It runs on CUDA when torch sees a GPU (float32 with
TF32 matmuls), else on the CPU with as many threads as XLA:CPU uses
(`torch_baselines.use_cpu_threads`). Two ways to run C clients x S Adam steps:

  loop: for each client, the adapter reset to the round's start (`set_peft_model_state_dict`), a
        fresh `torch.optim.Adam`, S forward/backward/step iterations: what PEFT-based federated
        repositories (e.g. FedIT's, FLoRA's) do per client;
  vmap: clients in chunks; per chunk, `torch.func.vmap(torch.func.grad(loss))` over the chunk's
        stacked trainable tensors through `torch.func.functional_call` of the PEFT model (eager
        attention: torch.func has no batching rule for SDPA's CPU kernels), and a functional
        Adam on them.

A CLIP classifies by its logits against C_text class prompts ([C_text, L] token ids), the text
tower run every step, as the JAX benchmark's CLIP does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from benchmarks import torch_baselines


def available() -> tuple[bool, str]:
  """(whether torch, transformers and peft import, why not)."""
  try:
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as e:
    return False, f"{e.name} is not installed; install the optional extra: pip install -e .[bench]"
  return True, ""


def _device(torch) -> str:
  return "cuda" if torch.cuda.is_available() else "cpu"


def _targets(model, short: tuple[str, ...], long: tuple[str, ...]) -> list[str]:
  """The query/value module names of this transformers version: 5.x's ViT has q_proj/v_proj
  where 4.x has query/value (CLIP has q_proj/v_proj in both)."""
  names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
  return list(short) if set(short) <= names else list(long)


def per_client_loop(torch, peft, model, num: int, steps: int, learning_rate: float, step_loss):
  """The round as PEFT-based federated repositories run it: `loop()` runs, for each of `num`
  clients, the adapter reset to the round's start (`set_peft_model_state_dict`), a fresh
  `torch.optim.Adam` and `steps` zero_grad / `step_loss(client, step).backward()` / step."""
  start_state = {k: v.clone() for k, v in peft.get_peft_model_state_dict(model).items()}

  def loop():
    for c in range(num):
      peft.set_peft_model_state_dict(model, start_state)
      optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
      for s in range(steps):
        optimizer.zero_grad()
        step_loss(c, s).backward()
        optimizer.step()

  return loop


def build_vit(arch: dict, image_size: int, rank: int, alpha: float, attention: str = "sdpa", classes: int = 10):
  """A PEFT-wrapped `ViTForImageClassification` of `arch` (the JAX benchmark's model fields:
  patch_size, width, depth, num_heads, mlp_ratio or mlp_dim); `attention`: transformers'
  attention implementation ("sdpa", its default, or "eager")."""
  import peft
  import transformers

  config = transformers.ViTConfig(
    hidden_size=arch["width"],
    num_hidden_layers=arch["depth"],
    num_attention_heads=arch["num_heads"],
    intermediate_size=arch.get("mlp_dim") or int(arch["mlp_ratio"] * arch["width"]),
    image_size=image_size,
    patch_size=arch["patch_size"],
    num_labels=classes,
    hidden_act="gelu",
  )
  config._attn_implementation = attention
  model = transformers.ViTForImageClassification(config)
  lora = peft.LoraConfig(
    r=rank,
    lora_alpha=alpha,
    lora_dropout=0.0,
    modules_to_save=["classifier"],
    target_modules=_targets(model, ("q_proj", "v_proj"), ("query", "value")),
  )
  return peft.get_peft_model(model, lora).eval()


def build_clip(arch: dict, image_size: int, rank: int, alpha: float, attention: str = "sdpa"):
  """A PEFT-wrapped `CLIPModel` of `arch` (the JAX benchmark's CLIP fields; the end of text is
  the largest id); `attention` as `build_vit`'s."""
  import peft
  import transformers

  text = transformers.CLIPTextConfig(
    hidden_size=arch["text_width"],
    num_hidden_layers=arch["text_depth"],
    num_attention_heads=arch["text_heads"],
    intermediate_size=arch.get("text_mlp_dim") or int(arch.get("mlp_ratio", 4.0) * arch["text_width"]),
    vocab_size=arch["vocab_size"],
    max_position_embeddings=arch["max_len"],
    hidden_act="quick_gelu",
    bos_token_id=arch["vocab_size"] - 2,
    eos_token_id=arch["vocab_size"] - 1,
    pad_token_id=0,
  )
  vision = transformers.CLIPVisionConfig(
    hidden_size=arch["width"],
    num_hidden_layers=arch["depth"],
    num_attention_heads=arch["num_heads"],
    intermediate_size=arch.get("mlp_dim") or int(arch.get("mlp_ratio", 4.0) * arch["width"]),
    image_size=image_size,
    patch_size=arch["patch_size"],
    hidden_act="quick_gelu",
  )
  config = transformers.CLIPConfig(
    text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=arch["embed_dim"]
  )
  config._attn_implementation = attention
  for tower in (config.text_config, config.vision_config):
    tower._attn_implementation = attention
  lora = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
  return peft.get_peft_model(transformers.CLIPModel(config), lora).eval()


def round_fn(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  model_name: str,
  arch: dict,
  rank: int,
  alpha: float,
  learning_rate: float,
  way: str,
  chunk: int = 16,
  prompt_ids: np.ndarray | None = None,
) -> Callable[[], None]:
  """`run()`: one round, C clients x S Adam steps ("loop" or "vmap" in chunks), waiting for
  CUDA's kernels; time it with `benchmarks.timing.interleaved_times` beside the JAX ways.

  Args:
    images: uint8 NumPy [C, S, B, H, W, 3]; labels: int [C, S, B].
    model_name: "vit" or "clip" (then `prompt_ids`: int [C_text, L], the class prompts).
  """
  import peft
  import torch
  from torch.func import functional_call, grad, vmap

  device = _device(torch)
  if device == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
  else:
    torch_baselines.use_cpu_threads(torch)
  torch.manual_seed(0)
  size = images.shape[3]
  build = build_clip if model_name == "clip" else build_vit
  # vmap: eager attention, which torch.func batches (it runs SDPA's CPU kernels one client at a time).
  model = build(arch, size, rank, alpha, "eager" if way == "vmap" else "sdpa").to(device)
  num, steps = images.shape[:2]
  pixels = torch.from_numpy(images).to(device)
  labels_t = torch.from_numpy(labels).long().to(device)
  texts = None if prompt_ids is None else torch.from_numpy(np.asarray(prompt_ids)).long().to(device)
  to_input = lambda x: x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # uint8 NHWC -> NCHW in [-1, 1].

  def logits(module, x):
    if model_name == "clip":
      return module(input_ids=texts, pixel_values=to_input(x)).logits_per_image
    return module(pixel_values=to_input(x)).logits

  loop = per_client_loop(
    torch,
    peft,
    model,
    num,
    steps,
    learning_rate,
    lambda c, s: torch.nn.functional.cross_entropy(logits(model, pixels[c, s]), labels_t[c, s]),
  )

  frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
  init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

  def client_loss(trainable, xs, ys):
    call = lambda **kwargs: functional_call(model, {**frozen, **trainable}, (), kwargs)
    out = (
      call(input_ids=texts, pixel_values=to_input(xs))["logits_per_image"]
      if model_name == "clip"
      else call(pixel_values=to_input(xs))["logits"]
    )
    return torch.nn.functional.cross_entropy(out, ys)

  per_client_grad = vmap(grad(client_loss), in_dims=(0, 0, 0))  # Over clients; each grad over its batch.

  vmapped = lambda: torch_baselines.vmapped_adam(torch, per_client_grad, init, pixels, labels_t, chunk, learning_rate)
  return torch_baselines.synchronized(torch, {"loop": loop, "vmap": vmapped}[way])


def build_llama(config_json: dict, rank: int, alpha: float, attention: str = "sdpa", dtype=None):
  """A PEFT-wrapped `LlamaForCausalLM` (or Qwen2 / Mistral, by `config_json["model_type"]`) of a
  transformers config.json (`hf.decoder_config` of the JAX benchmark's `DecoderLM`), random
  weights in `dtype` (None: float32), LoRA (rank r, `lora_alpha`; float32 factors) on the
  attention's q_proj and v_proj; `attention` as `build_vit`'s."""
  import peft
  import transformers

  fields = {k: v for k, v in config_json.items() if k not in ("architectures", "torch_dtype")}
  config = transformers.AutoConfig.for_model(**fields)
  config._attn_implementation = attention
  model = transformers.AutoModelForCausalLM.from_config(config)
  if dtype is not None:
    model = model.to(dtype)
  lora = peft.LoraConfig(
    r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
  )
  return peft.get_peft_model(model, lora).eval()


def text_round(
  input_ids: np.ndarray,
  loss_mask: np.ndarray,
  *,
  config_json: dict,
  rank: int,
  alpha: float,
  learning_rate: float,
  way: str = "loop",
  chunk: int = 16,
) -> tuple[Callable[[], None], Callable[[], int]]:
  """(`run()`, `peak_bytes()`): one instruction-tuning round, C clients x S Adam steps of a decoder
  ("loop": the per-client loop PEFT-based federated LLM repositories run, OpenFedLLM's and
  FlowerTune's; "vmap": torch.func.vmap in chunks), the loss transformers' own: `labels` the
  token ids with -100 where `loss_mask` is 0, mean over the counted next tokens. On CUDA the
  frozen weights are bfloat16 and the step runs under `torch.autocast(bfloat16)` (LoRA factors
  and Adam float32), as `Trainer(bf16=True)` on a bfloat16 checkpoint; on the CPU float32.

  `run` waits for CUDA's kernels; time it with `benchmarks.timing.interleaved_times` beside the JAX
  ways. `peak_bytes()`: the most CUDA memory torch allocated during any one `run()` so far (0 on
  the CPU).

  Args:
    input_ids: int NumPy [C, S, B, T] (full-length sequences, no padding); loss_mask: [C, S, B, T].
  """
  import contextlib

  import peft
  import torch
  from torch.func import functional_call, grad, vmap

  device = _device(torch)
  if device == "cpu":
    torch_baselines.use_cpu_threads(torch)
  torch.manual_seed(0)
  dtype = torch.bfloat16 if device == "cuda" else None
  autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else contextlib.nullcontext
  model = build_llama(config_json, rank, alpha, "eager" if way == "vmap" else "sdpa", dtype).to(device)
  num, steps = input_ids.shape[:2]
  ids = torch.from_numpy(np.asarray(input_ids)).long().to(device)
  labels = torch.where(torch.from_numpy(np.asarray(loss_mask)).to(device) > 0, ids, -100)

  def step_loss(c, s):
    with autocast():
      return model(input_ids=ids[c, s], labels=labels[c, s]).loss

  loop = per_client_loop(torch, peft, model, num, steps, learning_rate, step_loss)

  frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
  init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

  def client_loss(trainable, xs, ys):
    with autocast():
      logits = functional_call(model, {**frozen, **trainable}, (), {"input_ids": xs})["logits"][:, :-1]
    targets = ys[:, 1:]
    weights = (targets >= 0).float()  # ignore_index=-100 written out: vmap has no rule for it.
    nll = torch.nn.functional.cross_entropy(
      logits.float().flatten(0, 1), targets.clamp(min=0).flatten(), reduction="none"
    )
    return (nll * weights.flatten()).sum() / weights.sum().clamp(min=1.0)

  per_client_grad = vmap(grad(client_loss), in_dims=(0, 0, 0))
  vmapped = lambda: torch_baselines.vmapped_adam(torch, per_client_grad, init, ids, labels, chunk, learning_rate)
  way_fn = {"loop": loop, "vmap": vmapped}[way]
  peak = [0]

  def run():
    if device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    way_fn()
    if device == "cuda":
      torch.cuda.synchronize()  # Kernels run asynchronously: wait for the last one.
      peak[0] = max(peak[0], torch.cuda.max_memory_allocated())

  return run, lambda: peak[0]
