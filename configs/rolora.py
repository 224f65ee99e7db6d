"""method=rolora on the embedded default benchmark (see configs/default.py for every field).

  python -m experiments.main --config configs/rolora.py --workdir runs/rolora
  python -m experiments.main --config configs/rolora.py:seed=1,rounds=50 --workdir runs/rolora_s1
"""
from configs import default


def get_config(arg: str | None = None):
  return default.get_config(",".join(filter(None, ["method=rolora", arg])))
