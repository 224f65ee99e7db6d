"""method=local_only on the embedded default benchmark (see configs/default.py for every field).

  python -m experiments.main --config configs/local_only.py --workdir runs/local_only
  python -m experiments.main --config configs/local_only.py:seed=1,rounds=50 --workdir runs/local_only_s1
"""
from configs import default


def get_config(arg: str | None = None):
  return default.get_config(",".join(filter(None, ["method=local_only", arg])))
