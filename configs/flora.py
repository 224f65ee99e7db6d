"""method=flora on the embedded default benchmark (see configs/default.py for every field).

  python -m experiments.main --config configs/flora.py --workdir runs/flora
  python -m experiments.main --config configs/flora.py:seed=1,rounds=50 --workdir runs/flora_s1
"""
from configs import default


def get_config(arg: str | None = None):
  return default.get_config(",".join(filter(None, ["method=flora", arg])))
