"""8 forced CPU devices give the same run as 1, for FedIT and HyperLoRA (in a subprocess:
XLA_FLAGS precede jax)."""
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    assert len(jax.devices()) == 8, jax.devices()
    from configs import default
    from hyperlora_jax.train import train_and_evaluate
    out = {}
    for method, devices, chunk in (("fedit", 1, 0), ("fedit", 8, 0), ("fedit", 8, 8),
                                   ("hyperlora", 1, 0), ("hyperlora", 8, 8)):
      config = default.get_config(f"smoke,method={method}")
      config.data.data_dir, config.pretrain.cache_dir = sys.argv[1], sys.argv[2]
      config.fed.num_devices, config.fed.clients_per_chunk = devices, chunk
      result = train_and_evaluate(config, f"{sys.argv[3]}/{method}d{devices}c{chunk}", progress=False,
                                  log=lambda _: None)
      out[f"{method}/{devices}/{chunk}"] = result["records"]
    print("RESULT" + json.dumps(out))
""")


def test_eight_devices_match_one(cache_dirs, tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  proc = subprocess.run([sys.executable, "-c", SCRIPT, cache_dirs["data_dir"], cache_dirs["cache_dir"],
                         str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  runs = json.loads(line[len("RESULT"):])
  # HyperLoRA has SVDs and a meta-gradient whose reductions are ordered differently on 8
  # devices; the float noise compounds over rounds through the SVD basis and the generator
  # (train loss differences of 1e-4 seen on 2.29), and can flip the argmax of borderline test
  # examples (1 of 1,512 = 6.6e-4). A sharding bug moves these by 1e-1.
  exact = {"train_loss": 1e-5, "global_accuracy": 1e-5, "personalized_accuracy_mean": 1e-5}
  noisy = {"train_loss": 2e-3, "global_accuracy": 5e-3, "personalized_accuracy_mean": 5e-3}
  for one, key, tols in (("fedit/1/0", "fedit/8/0", exact), ("fedit/1/0", "fedit/8/8", exact),
                         ("hyperlora/1/0", "hyperlora/8/8", noisy)):
    assert len(runs[key]) == len(runs[one])
    for a, b in zip(runs[one], runs[key]):
      for field, tol in tols.items():
        assert abs(a[field] - b[field]) < tol, (key, field, a[field], b[field])
