"""The command lines' errors: one line naming the field, file, line or tensor, no traceback
unless asked (`--verbose`).

    python -m experiments.main --config configs/instruction_tuning.py:clients=abc --workdir runs/x
    error: ConfigArgumentError: config argument clients='abc': an integer expected (--verbose: the traceback)

What the user can fix is raised as these types with the field, file, line or tensor in its
message (`ConfigError`, `CheckpointError`, cache and integrity errors are ValueErrors; a missing
or unreadable file an OSError; a diverged run a FloatingPointError; a corrupt checkpoint or
a workdir in use a RuntimeError). Anything else is a bug, and keeps its traceback.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from collections.abc import Callable

USER_ERRORS = (ValueError, OSError, FloatingPointError, RuntimeError)


def verbose_requested(argv: list[str]) -> bool:
  return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv)


def one_line(error: BaseException) -> str:
  """`Type: message` on one line (a multi-line message's lines joined)."""
  message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
  return f"{type(error).__name__}: {message}"


def config_spec_of(argv: list[str]) -> str | None:
  """The value of --config in `argv` (either --config=X or --config X), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def run_reporting_errors(
  run: Callable[[], None], argv: list[str], load_config: Callable[[str], object] | None = None
) -> None:
  """Runs `run()`; a user error (`USER_ERRORS`) exits with its one line (status 1) unless
  --verbose is in `argv`. `load_config` evaluates the --config file first, so that its
  arguments' errors are reported the same way (absl would print them with a traceback)."""
  verbose = verbose_requested(argv)
  try:
    spec = config_spec_of(argv)
    if load_config is not None and spec is not None:
      load_config(spec)
    run()
  except USER_ERRORS as e:
    if verbose:
      raise
    sys.exit(f"error: {one_line(e)} (--verbose: the traceback)")


def run(
  main: Callable[..., object], *, absl_app: bool = False, load_config: Callable[[str], object] | None = None
) -> None:
  """An entry point's `if __name__ == "__main__"`: `main` (an absl `app.run` main with
  `absl_app`, else a plain function reading sys.argv, e.g. with argparse) with user errors
  reported in one line (`run_reporting_errors`); `--verbose` is taken off the arguments an
  argparse main sees, and defined as a flag for an absl one."""
  argv = sys.argv[1:]
  if absl_app:
    from absl import app, flags

    if "verbose" not in flags.FLAGS:
      flags.DEFINE_bool("verbose", False, "Errors with their traceback (default: one line naming the field or file).")
    target = lambda: app.run(main)
  else:
    sys.argv = sys.argv[:1] + [a for a in argv if not verbose_requested([a])]
    target = main
  run_reporting_errors(target, argv, load_config)


def load_config_file(config_spec: str):
  """`get_config(arg)` of 'path/to/file.py[:arg]' (the config_flags convention)."""
  path, _, arg = config_spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"config {config_spec}: no such config file {path!r}")
  module_spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def parse_override(text: str) -> tuple[str, object]:
  """'fed.num_rounds=15' -> ('fed.num_rounds', 15); non-literals stay strings."""
  field, _, value = text.partition("=")
  try:
    return field, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return field, value


def set_field(config, field: str, value) -> None:
  """config['a']['b'] = value for field 'a.b'; raises ValueError for a field that does not exist."""
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    if p not in node:
      raise ValueError(f"--set {field}: no such config field")
    node = node[p]
  if leaf not in node:
    raise ValueError(f"--set {field}: no such config field")
  node[leaf] = value
