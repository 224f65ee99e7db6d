"""Label skew at cross-device scale on the embedded data: 100 clients, 10 per round, each
client's label distribution q_k ~ Dirichlet(α) (Hsu et al., 2019; `client_dirichlet`: with 100
clients and α = 0.1 a per-class Dirichlet over clients leaves most clients empty) over the pooled six domains of `digits_domains/res16` (6,036 train /
1,512 test images, 10 classes, chance 10%), plus 10 held-out new clients drawn by the same
partition (110 in all), never trained on, evaluated at the end from the global model and from
the method's generated start (`new_client_*` metrics).

  python -m experiments.main --config configs/label_skew.py:alpha=0.1,method=hyperlora --workdir runs/ls

Args: alpha (0.1 | 0.5 | 1.0, default 0.5), heldout (default 10), model (vit | mixer), plus
configs/default.py's method, seed, rounds, smoke. 15 rounds of 10 local steps (batch 32).
"""

from configs import benchmarks, default


def get_config(arg: str | None = None):
  args = default.parse_arg(arg)
  config = default.get_config(arg)
  alpha = args.float("alpha", 0.5)
  benchmarks.use_embedded_model(config, args, f"label_skew_100/alpha{alpha:g}")
  config.data.partition = "client_dirichlet"
  config.data.dirichlet_alpha = alpha
  config.data.num_clients, config.fed.clients_per_round = 100, 10
  config.data.heldout_clients = args.int("heldout", 10)
  config.data.min_client_size = 5
  if args.get("smoke"):
    config.data.num_clients, config.fed.clients_per_round, config.data.heldout_clients = 12, 4, 2
  else:
    config.fed.num_rounds = args.int("rounds", 15)
  return config
