"""method=hyperlora on the embedded default benchmark (see configs/default.py for every field).

  python -m experiments.main --config configs/hyperlora.py --workdir runs/hyperlora
  python -m experiments.main --config configs/hyperlora.py:seed=1,ablation=no_generator --workdir runs/hl_nogen

Ablations (`ablation=NAME`, several joined by '+'): each switches one component off or swaps it.
"""
from configs import default

ABLATIONS = {
    "no_generator": {"generator": False},              # Clients start from the global adapter.
    "uniform_synthesizer": {"synthesizer": "uniform"},  # Exact weighted product average + rank-r SVD.
    "no_corrector": {"corrector": "none"},
    "fair_corrector": {"corrector": "fair"},            # LoRA-FAIR's ΔB fit instead of C_ω.
    "label_signature": {"signature": "label"},
    "features_signature": {"signature": "features"},
    "embedding_signature": {"signature": "embedding"},  # pFedHN-style learned client embedding.
    "noisy_signature": {"signature_noise_std": 0.5},
    "distill_generator": {},                           # G_φ by product-space distillation (below).
    "nothing_learned": {"generator": False, "synthesizer": "uniform", "corrector": "none"},
}


def get_config(arg: str | None = None):
  args = default.parse_arg(arg)
  ablation = args.pop("ablation", "")
  rest = ",".join(k if v is True else f"{k}={v}" for k, v in args.items())
  config = default.get_config(",".join(filter(None, ["method=hyperlora", rest])))
  for name in filter(None, str(ablation).split("+")):
    if name not in ABLATIONS:
      raise ValueError(f"ablation={name!r}; allowed: {', '.join(ABLATIONS)}")
    for field, value in ABLATIONS[name].items():
      config.hyperlora[field] = value
    if name == "distill_generator":
      config.generator.loss = "product_distill"
  return config
