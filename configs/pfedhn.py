"""method=pfedhn on the embedded default benchmark (see configs/default.py for every field).

  python -m experiments.main --config configs/pfedhn.py --workdir runs/pfedhn
  python -m experiments.main --config configs/pfedhn.py:seed=1,rounds=50 --workdir runs/pfedhn_s1
"""
from configs import default


def get_config(arg: str | None = None):
  return default.get_config(",".join(filter(None, ["method=pfedhn", arg])))
