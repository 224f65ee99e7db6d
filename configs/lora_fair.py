"""method=lora_fair on the embedded default benchmark (see configs/default.py for every field).

  python -m experiments.main --config configs/lora_fair.py --workdir runs/lora_fair
  python -m experiments.main --config configs/lora_fair.py:seed=1,rounds=50 --workdir runs/lora_fair_s1
"""
from configs import default


def get_config(arg: str | None = None):
  return default.get_config(",".join(filter(None, ["method=lora_fair", arg])))
