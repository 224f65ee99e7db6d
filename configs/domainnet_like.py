"""DomainNet-like feature shift on the embedded data: the same ten digit classes in six
visual domains (inverted, colour, noisy, rotated, sketch, thick; `digits_domains/res16`,
6,036 train / 1,512 test images, chance 10%), the LoRA-FAIR / HyperLoRA protocol:

  clients_per_domain=1   feature shift: one client per domain, 6 clients, all 6 per round
  clients_per_domain=5   feature + label shift: each domain split over 5 clients by a
                         Dirichlet(α=0.5) label skew, 30 clients, 10 per round (default)

  python -m experiments.main --config configs/domainnet_like.py:method=hyperlora --workdir runs/dn
  python -m experiments.main --config configs/domainnet_like.py:clients_per_domain=1,model=mixer \
      --workdir runs/dn_mixer

Args (comma-separated): clients_per_domain, model (vit | mixer), alpha, plus configs/default.py's
method, seed, rounds, smoke. 15 rounds of 10 local steps (batch 32).
"""

from configs import benchmarks, default


def get_config(arg: str | None = None):
  args = default.parse_arg(arg)
  config = default.get_config(arg)
  per_domain = args.int("clients_per_domain", 5)
  benchmarks.use_embedded_model(config, args, f"domainnet_like/{per_domain}_per_domain")
  config.data.dirichlet_alpha = args.float("alpha", 0.5)
  if per_domain == 1:
    config.data.partition, config.data.num_clients = "one_domain_per_client", 6
    config.fed.clients_per_round = 6
  else:
    config.data.partition, config.data.num_clients = "domain_dirichlet", 6 * per_domain
    config.fed.clients_per_round = min(10, 6 * per_domain)
  if args.get("smoke"):
    config.fed.clients_per_round = min(config.fed.clients_per_round, 6)
  else:
    config.fed.num_rounds = args.int("rounds", 15)
  return config
