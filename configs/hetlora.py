"""method=hetlora on the embedded default benchmark (see configs/default.py for every field).

  python -m experiments.main --config configs/hetlora.py --workdir runs/hetlora
  python -m experiments.main --config configs/hetlora.py:seed=1,rounds=50 --workdir runs/hetlora_s1
"""
from configs import default


def get_config(arg: str | None = None):
  return default.get_config(",".join(filter(None, ["method=hetlora", arg])))
