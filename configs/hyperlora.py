"""method=hyperlora on the embedded default benchmark (see configs/default.py for every field).

  python -m experiments.main --config configs/hyperlora.py --workdir runs/hyperlora
  python -m experiments.main --config configs/hyperlora.py:seed=1,ablation=no_generator --workdir runs/hl_nogen

Ablations (`ablation=NAME`, several joined by '+'): each switches one component off or swaps it.
"""

from configs import default

ABLATIONS = {
  "no_generator": {"generator": False},  # Clients start from the global adapter.
  "uniform_synthesizer": {"synthesizer": "uniform"},  # Exact weighted product average + rank-r SVD.
  "no_corrector": {"corrector": "none"},
  "fair_corrector": {"corrector": "fair"},  # LoRA-FAIR's ΔB fit instead of C_ω.
  "label_signature": {"signature": "label"},
  "features_signature": {"signature": "features"},
  "embedding_signature": {"signature": "embedding"},  # pFedHN-style learned client embedding.
  "noisy_signature": {"signature_noise_std": 0.5},
  "distill_generator": {},  # G_φ by product-space distillation (below).
  "nothing_learned": {"generator": False, "synthesizer": "uniform", "corrector": "none"},
  "private": {"synthesizer": "uniform", "corrector": "none"},  # What dp.noise_multiplier > 0 allows.
}


def get_config(arg: str | None = None):
  config = default.get_config(",".join(filter(None, ["method=hyperlora", arg])))  # Ignores `ablation`.
  for name in filter(None, str(default.parse_arg(arg).get("ablation", "")).split("+")):
    if name not in ABLATIONS:
      raise ValueError(f"ablation={name!r}; allowed: {', '.join(ABLATIONS)}")
    for field, value in ABLATIONS[name].items():
      config.hyperlora[field] = value
    if name == "distill_generator":
      config.generator.loss = "product_distill"
  return config
