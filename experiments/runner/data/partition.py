"""Client partitions as pure NumPy functions of (labels, domains, seed).

Every partitioner first draws *shares*: for each group key (a class, a domain, or a
(domain, class) pair) a distribution over clients, `shares[key] -> [num_clients]`. The
train pool and the test pool are then both split by the same shares
(`split_by_shares`), so each client's test split follows its train distribution, and
every example of either pool goes to exactly one client. Partitions depend only on the seed.

Families (say which one a run uses):
  dirichlet_label_skew     per class over clients, p_c ~ Dir(alpha 1_N), redrawn until every
                           client has >= min_size train examples (NIID-Bench)
  client_dirichlet         per client q_k ~ Dir(alpha 1_C) over classes (Hsu et al., 2019), each
                           class rationed to its clients in proportion to q_k[c]: equal-sized
                           clients in expectation, feasible for 100+ clients at alpha = 0.1
  k_classes_per_client     k classes per client, shares ~ U[0.4, 0.6] (pFedHN)
  one_domain_per_client    feature shift: client d holds domain d
  domain_dirichlet         feature + label shift: each domain split over its clients by
                           a Dirichlet label skew
"""

from __future__ import annotations


import numpy as np

Shares = dict  # group key -> [num_clients] float array summing to 1.
ALLOWED_PARTITIONS = (
  "dirichlet_label_skew",
  "client_dirichlet",
  "k_classes_per_client",
  "one_domain_per_client",
  "domain_dirichlet",
)


def _cuts(share: np.ndarray, group_size: int) -> np.ndarray:
  """Where a group of `group_size` shuffled examples is cut into per-client pieces."""
  return (np.cumsum(share)[:-1] * group_size).round().astype(int)


def _piece_sizes(share: np.ndarray, group_size: int) -> np.ndarray:
  """[num_clients] sizes `split_by_shares` gives each client from one group."""
  return np.diff(np.concatenate([[0], _cuts(share, group_size), [group_size]]))


def split_by_shares(keys: np.ndarray, shares: Shares, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
  """Splits example indices over clients: the examples of group `key` by `shares[key]`.

  Args:
    keys: [N] hashable group key of each example.
    shares: group key -> [num_clients] proportions.
    num_clients: number of clients.
    rng: shuffles each group before cutting it.
  Returns:
    num_clients sorted int64 index arrays; together they hold every index exactly once.
  """
  parts = [[] for _ in range(num_clients)]
  for key in sorted(set(keys.tolist())):
    members = rng.permutation(np.flatnonzero(keys == key))
    if key not in shares:
      raise ValueError(f"no client shares for group {key!r}")
    for client, chunk in enumerate(np.split(members, _cuts(shares[key], len(members)))):
      parts[client].append(chunk)
  return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts]


def dirichlet_label_skew_shares(
  labels: np.ndarray,
  num_clients: int,
  alpha: float,
  rng: np.random.Generator,
  min_size: int = 10,
  max_tries: int = 1000,
) -> Shares:
  """p_c ~ Dir(alpha 1_N) per class c, redrawn until each client gets >= min_size examples."""
  classes = np.unique(labels)
  for _ in range(max_tries):
    shares = {int(c): rng.dirichlet(alpha * np.ones(num_clients)) for c in classes}
    sizes = sum(_piece_sizes(shares[int(c)], int(np.sum(labels == c))) for c in classes)
    if sizes.min() >= min_size:
      return shares
  raise ValueError(
    f"data.min_client_size={min_size} unreachable with {num_clients} clients, "
    f"alpha={alpha}, {len(labels)} examples after {max_tries} draws"
  )


def client_dirichlet_shares(
  labels: np.ndarray,
  num_clients: int,
  alpha: float,
  rng: np.random.Generator,
  min_size: int = 10,
  max_tries: int = 1000,
) -> Shares:
  """q_k ~ Dir(alpha 1_C) per client; class c goes to client k in proportion q_k[c] / Σ_j q_j[c].
  Redrawn until each client gets >= min_size examples."""
  classes = np.unique(labels)
  for _ in range(max_tries):
    q = rng.dirichlet(alpha * np.ones(len(classes)), size=num_clients)  # [N, C]
    shares = {int(c): q[:, i] / q[:, i].sum() for i, c in enumerate(classes)}
    sizes = sum(_piece_sizes(shares[int(c)], int(np.sum(labels == c))) for c in classes)
    if sizes.min() >= min_size:
      return shares
  raise ValueError(
    f"data.min_client_size={min_size} unreachable with {num_clients} clients, "
    f"alpha={alpha}, {len(labels)} examples after {max_tries} draws"
  )


def k_classes_per_client_shares(labels: np.ndarray, num_clients: int, k: int, rng: np.random.Generator) -> Shares:
  """Client i holds k classes (assigned round-robin over a shuffled class order); the
  clients holding class c split it with weights drawn from U[0.4, 0.6], normalised."""
  classes = np.unique(labels)
  if not 1 <= k <= len(classes):
    raise ValueError(f"data.classes_per_client={k} must be in [1, {len(classes)}]")
  order = rng.permutation(classes)
  holders = {int(c): [] for c in classes}
  for client in range(num_clients):
    for j in range(k):
      holders[int(order[(client * k + j) % len(classes)])].append(client)
  shares = {}
  for c, owners in holders.items():
    w = np.zeros(num_clients)
    if owners:
      np.add.at(w, owners, rng.uniform(0.4, 0.6, size=len(owners)))
    else:  # More classes than client slots: give the class to a random client.
      w[rng.integers(num_clients)] = 1.0
    shares[c] = w / w.sum()
  return shares


def one_domain_per_client_shares(domains: np.ndarray, num_clients: int) -> Shares:
  """Client d holds all of domain d (num_clients must equal the number of domains)."""
  present = np.unique(domains)
  if len(present) != num_clients:
    raise ValueError(
      f"data.num_clients={num_clients} must equal the number of domains "
      f"({len(present)}) for partition 'one_domain_per_client'"
    )
  return {int(d): np.eye(num_clients)[i] for i, d in enumerate(present)}


def domain_dirichlet_shares(
  labels: np.ndarray,
  domains: np.ndarray,
  clients_per_domain: int,
  alpha: float,
  rng: np.random.Generator,
  min_size: int = 10,
) -> Shares:
  """Domain d is split over its own `clients_per_domain` clients by a Dirichlet label
  skew; keys are `domain * 100000 + label`."""
  shares = {}
  for i, d in enumerate(np.unique(domains)):
    in_d = domains == d
    local = dirichlet_label_skew_shares(labels[in_d], clients_per_domain, alpha, rng, min_size)
    for c, p in local.items():
      w = np.zeros(clients_per_domain * len(np.unique(domains)))
      w[i * clients_per_domain : (i + 1) * clients_per_domain] = p
      shares[int(d) * 100000 + c] = w
  return shares


def partition_keys(kind: str, labels: np.ndarray, domains: np.ndarray) -> np.ndarray:
  """[N] group key of each example for a partition family."""
  if kind in ("dirichlet_label_skew", "client_dirichlet", "k_classes_per_client"):
    return labels.astype(np.int64)
  if kind == "one_domain_per_client":
    return domains.astype(np.int64)
  if kind == "domain_dirichlet":
    return domains.astype(np.int64) * 100000 + labels
  raise ValueError(f"data.partition={kind!r}; allowed: {ALLOWED_PARTITIONS}")


def make_shares(
  kind: str,
  labels: np.ndarray,
  domains: np.ndarray,
  num_clients: int,
  rng: np.random.Generator,
  *,
  alpha: float = 0.5,
  classes_per_client: int = 2,
  min_size: int = 10,
) -> Shares:
  """Draws the shares of a partition family from the train pool's labels and domains."""
  if kind == "dirichlet_label_skew":
    return dirichlet_label_skew_shares(labels, num_clients, alpha, rng, min_size)
  if kind == "client_dirichlet":
    return client_dirichlet_shares(labels, num_clients, alpha, rng, min_size)
  if kind == "k_classes_per_client":
    return k_classes_per_client_shares(labels, num_clients, classes_per_client, rng)
  if kind == "one_domain_per_client":
    return one_domain_per_client_shares(domains, num_clients)
  if kind == "domain_dirichlet":
    num_domains = len(np.unique(domains))
    if num_clients % num_domains:
      raise ValueError(
        f"data.num_clients={num_clients} must be a multiple of the number of "
        f"domains ({num_domains}) for partition 'domain_dirichlet'"
      )
    return domain_dirichlet_shares(labels, domains, num_clients // num_domains, alpha, rng, min_size)
  raise ValueError(f"data.partition={kind!r}; allowed: {ALLOWED_PARTITIONS}")


def cap_examples(parts: list[np.ndarray], max_examples: int, seed: int) -> list[np.ndarray]:
  """Each client's indices, a seeded random subset of at most `max_examples` of them (0: all),
  kept in index order. Label and domain proportions are kept in expectation."""
  if not max_examples:
    return parts
  rng = np.random.default_rng([seed, 7])
  return [
    np.sort(rng.choice(part, max_examples, replace=False)) if len(part) > max_examples else part for part in parts
  ]


def split_validation(parts: list[np.ndarray], fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """(train, validation): each client's indices split at random (seeded), ⌊fraction · n⌋ of
  them, but at least one while at least one stays for training, held out for validation;
  both kept in index order. fraction 0: (parts, empty parts)."""
  if not fraction:
    return parts, [part[:0] for part in parts]
  rng = np.random.default_rng([seed, 11])
  train, validation = [], []
  for part in parts:
    held = min(max(int(fraction * len(part)), 1), len(part) - 1) if len(part) > 1 else 0
    chosen = np.zeros(len(part), bool)
    chosen[rng.choice(len(part), held, replace=False)] = True
    train.append(part[~chosen])
    validation.append(part[chosen])
  return train, validation


def partition_train_test(
  kind: str,
  train_labels: np.ndarray,
  train_domains: np.ndarray,
  test_labels: np.ndarray,
  test_domains: np.ndarray,
  num_clients: int,
  seed: int,
  **kwargs,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Partitions a train pool and a test pool over clients with the same per-client distribution.

  Returns:
    (train_parts, test_parts): num_clients index arrays into each pool.
  """
  rng = np.random.default_rng(seed)
  shares = make_shares(kind, train_labels, train_domains, num_clients, rng, **kwargs)
  train = split_by_shares(partition_keys(kind, train_labels, train_domains), shares, num_clients, rng)
  test = split_by_shares(partition_keys(kind, test_labels, test_domains), shares, num_clients, rng)
  return train, test
