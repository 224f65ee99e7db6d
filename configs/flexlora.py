"""method=flexlora on the embedded default benchmark (see configs/default.py for every field).

  python -m experiments.main --config configs/flexlora.py --workdir runs/flexlora
  python -m experiments.main --config configs/flexlora.py:seed=1,rounds=50 --workdir runs/flexlora_s1
"""
from configs import default


def get_config(arg: str | None = None):
  return default.get_config(",".join(filter(None, ["method=flexlora", arg])))
