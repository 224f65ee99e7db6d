"""method=fedex_lora on the embedded default benchmark (see configs/default.py for every field).

  python -m experiments.main --config configs/fedex_lora.py --workdir runs/fedex_lora
  python -m experiments.main --config configs/fedex_lora.py:seed=1,rounds=50 --workdir runs/fedex_lora_s1
"""
from configs import default


def get_config(arg: str | None = None):
  return default.get_config(",".join(filter(None, ["method=fedex_lora", arg])))
