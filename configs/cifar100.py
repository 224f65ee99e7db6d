"""CIFAR-100 through TFDS: 100 classes, label skew over 100 clients (10 per round,
Dirichlet α), 32x32 images resized to 224x224 for a ViT-B/16 (or Mixer-B/16) loaded from a
real checkpoint (a Hugging Face ViT directory or an `.npz`), LoRA r=16 on query/value.

Nothing is downloaded at run time: prepare it once, on a machine with a network,
  tfds build cifar100 --file_format=array_record --data_dir DIR
and fetch a checkpoint (see configs/domainnet.py).

  python -m experiments.main --workdir runs/cifar100 \
      --config configs/cifar100.py:checkpoint=/ckpt/vit-b16,data_dir=DIR,alpha=0.1,method=flexlora

Args: checkpoint or npz (one of them required), data_dir, alpha (default 0.5), heldout (new clients, default 0), model
(vit | mixer), image_size (default 224: see configs/domainnet.py), plus method, seed, rounds, smoke (tiny model,
32x32, for TFDS mock-data tests).
"""

from configs import default
from configs.domainnet import real_dataset_config


def get_config(arg: str | None = None):
  args = default.parse_arg(arg)
  config = real_dataset_config(args, arg)
  alpha = args.float("alpha", 0.5)
  config.benchmark = f"cifar100/alpha{alpha:g}"
  config.data.name = "cifar100"
  config.data.partition, config.data.dirichlet_alpha = "dirichlet_label_skew", alpha
  config.data.num_clients, config.fed.clients_per_round = 100, 10
  config.data.heldout_clients = args.int("heldout", 0)
  if args.get("smoke"):
    config.data.num_clients, config.fed.clients_per_round = 6, 4
    config.data.min_client_size = 1
  return config
