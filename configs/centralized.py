"""method=centralized on the embedded default benchmark (see configs/default.py for every field).

  python -m experiments.main --config configs/centralized.py --workdir runs/centralized
  python -m experiments.main --config configs/centralized.py:seed=1,rounds=50 --workdir runs/centralized_s1
"""
from configs import default


def get_config(arg: str | None = None):
  return default.get_config(",".join(filter(None, ["method=centralized", arg])))
