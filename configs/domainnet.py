"""DomainNet (Peng et al., 2019) through TFDS: 345 classes in six domains (clipart, infograph,
painting, quickdraw, real, sketch), 224x224, a ViT-B/16 (or Mixer-B/16) loaded from a real
checkpoint (a Hugging Face directory or an `.npz`), LoRA r=16 on query/value; the LoRA-FAIR /
HyperLoRA protocol.

Nothing is downloaded at run time: prepare the six configs once, on a machine with a network,
  tfds build domainnet --config real --file_format=array_record --data_dir DIR   (x6 domains)
and fetch a checkpoint: a Hugging Face ViT directory (`huggingface-cli download
google/vit-base-patch16-224-in21k --local-dir /ckpt/vit-b16`: config.json + model.safetensors;
the architecture is read from it), or an `.npz`, e.g.
gs://vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz
(`vision_transformer` or `big_vision` layout; `model=mixer`: gs://mixer_models/imagenet21k/Mixer-B_16.npz).

  python -m experiments.main --workdir runs/domainnet \
      --config configs/domainnet.py:checkpoint=/ckpt/vit-b16,data_dir=DIR,method=hyperlora,clients_per_domain=5

Args: checkpoint or npz (one of them required), data_dir, clients_per_domain (1: feature shift, one client per domain;
5: feature + label shift, Dirichlet α), alpha, model (vit | mixer), image_size (default 224; another size
resizes a Hugging Face checkpoint's position embeddings bicubically, as transformers' interpolate_pos_encoding),
plus method, seed, rounds, smoke (tiny model and 32x32 images, for tests with TFDS mock data).
"""

from configs import benchmarks, default

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


def real_dataset_config(args: dict, arg: str | None):
  """configs/default.py adapted to a prepared TFDS dataset and a real backbone (`checkpoint`: a
  Hugging Face directory; `npz`: an `.npz` file)."""
  config = default.get_config(arg)
  smoke = bool(args.get("smoke"))
  model = args.get("model", "vit")
  benchmarks.set_model(config, (benchmarks.EMBEDDED_MODELS if smoke else benchmarks.BASE_MODELS)[model], smoke=smoke)
  config.data.data_dir = args.get("data_dir", "")
  config.data.image_size = args.int("image_size", 32 if smoke else 224)
  config.data.stream = True  # Images read on demand: host memory stays bounded.
  config.pretrain.npz_path = args.get("npz", "")
  config.pretrain.checkpoint = args.get("checkpoint", "")
  config.pretrain.data_name = ""  # No pretraining: the backbone comes from the checkpoint.
  if not smoke:
    config.lora.rank, config.lora.alpha = 16, 32.0
    config.fed.num_rounds = args.int("rounds", 50)
    config.fed.batch_size, config.eval_batch = 32, 128
    config.client_optimizer.learning_rate = 1e-3
  return config


def get_config(arg: str | None = None):
  args = default.parse_arg(arg)
  config = real_dataset_config(args, arg)
  per_domain = args.int("clients_per_domain", 1)
  config.benchmark = f"domainnet/{per_domain}_per_domain"
  config.data.name = "+".join(f"domainnet/{d}" for d in DOMAINS)
  config.data.dirichlet_alpha = args.float("alpha", 0.5)
  if per_domain == 1:
    config.data.partition, config.data.num_clients = "one_domain_per_client", len(DOMAINS)
    config.fed.clients_per_round = len(DOMAINS)
  else:
    config.data.partition, config.data.num_clients = "domain_dirichlet", len(DOMAINS) * per_domain
    config.fed.clients_per_round = min(10, config.data.num_clients)
  if args.get("smoke"):
    config.data.min_client_size = 1
  return config
