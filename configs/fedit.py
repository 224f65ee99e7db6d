"""method=fedit on the embedded default benchmark (see configs/default.py for every field).

  python -m experiments.main --config configs/fedit.py --workdir runs/fedit
  python -m experiments.main --config configs/fedit.py:seed=1,rounds=50 --workdir runs/fedit_s1
"""
from configs import default


def get_config(arg: str | None = None):
  return default.get_config(",".join(filter(None, ["method=fedit", arg])))
