"""method=ffa_lora on the embedded default benchmark (see configs/default.py for every field).

  python -m experiments.main --config configs/ffa_lora.py --workdir runs/ffa_lora
  python -m experiments.main --config configs/ffa_lora.py:seed=1,rounds=50 --workdir runs/ffa_lora_s1
"""
from configs import default


def get_config(arg: str | None = None):
  return default.get_config(",".join(filter(None, ["method=ffa_lora", arg])))
