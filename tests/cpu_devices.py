"""The environment of a test's subprocess with N forced CPU devices: XLA_FLAGS must be set before
jax starts, so multi-device and multi-process tests run in subprocesses. The session's other XLA
flags (conftest.py's optimization level) are kept."""

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def cpu_devices_env(devices: int, **extra: str) -> dict[str, str]:
  """os.environ with JAX on the CPU as `devices` devices, plus `extra` variables."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
  return {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": " ".join(flags + [f"{DEVICE_COUNT_FLAG}={devices}"]),
    **extra,
  }
