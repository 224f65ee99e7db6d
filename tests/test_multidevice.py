"""8 forced CPU devices give the same run as 1 (in a subprocess: XLA_FLAGS precede jax)."""
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
    for devices, chunk in ((1, 0), (8, 0), (8, 8)):
      config = default.get_config("smoke")
      config.data.data_dir, config.pretrain.cache_dir = sys.argv[1], sys.argv[2]
      config.fed.num_devices, config.fed.clients_per_chunk = devices, chunk
      result = train_and_evaluate(config, f"{sys.argv[3]}/d{devices}c{chunk}", progress=False,
                                  log=lambda _: None)
      out[f"{devices}/{chunk}"] = result["records"]
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
  one = runs["1/0"]
  for key in ("8/0", "8/8"):
    assert len(runs[key]) == len(one)
    for a, b in zip(one, runs[key]):
      for field in ("train_loss", "global_accuracy", "personalized_accuracy_mean"):
        assert abs(a[field] - b[field]) < 1e-5, (key, field, a[field], b[field])
