"""The architecture's layers, read from the import statements of every module.

hyperlora_jax/            the library: no configs, no experiment runner, no datasets; the core
                          (everything but models/) does not import the model zoo; files are
                          read or written only where documented
experiments/runner/       the experiment runner, one user of the library
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "hyperlora_jax"
# The library's documented I/O (hyperlora_jax/__init__.py): PEFT adapters, the chunk-size cache,
# checkpoints of the model zoo (.npz, Hugging Face directories), and `files` (atomic writes,
# manifests and locks, for the files the others and the runner write).
DOCUMENTED_IO = {"peft.py", "autotune.py", "models/load.py", "models/hf.py", "files.py"}
FILE_CALLS = {"open", "load", "save", "savez", "save_file", "load_file", "safe_open", "dump"}


def imported_modules(path: pathlib.Path) -> set[str]:
  """Absolute module names imported anywhere in `path` (top level or inside functions)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def library_modules() -> list[pathlib.Path]:
  return sorted(LIBRARY.rglob("*.py"))


def test_the_scan_sees_the_whole_library_and_its_imports():
  """The walk finds every module (a broken glob would make the tests below vacuous), and the
  parser sees imports made inside functions too."""
  names = {str(p.relative_to(LIBRARY)) for p in library_modules()}
  assert {"federated.py", "lora.py", "aggregators/base.py", "hyper/synthesis.py", "models/vit.py"} <= names
  assert "hyperlora_jax.lora" in imported_modules(LIBRARY / "aggregators" / "base.py")
  assert "experiments.runner.data.loader" in imported_modules(ROOT / "experiments" / "runner" / "config_validation.py")


@pytest.mark.parametrize("forbidden", ["experiments", "configs", "ml_collections", "tensorflow_datasets", "orbax"])
def test_the_library_imports_no_runner_configs_or_datasets(forbidden):
  offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.split(".")[0] == forbidden)
               for p in library_modules()}
  assert not {p: m for p, m in offenders.items() if m}


def test_the_library_core_does_not_import_the_model_zoo():
  """Tasks and HyperLoRA's signatures take the model's input convention as an argument."""
  core = [p for p in library_modules() if p.parent.name != "models"]
  offenders = {str(p.relative_to(ROOT)) for p in core
               if any(m.startswith("hyperlora_jax.models") for m in imported_modules(p))}
  assert not offenders


def test_the_library_touches_files_only_where_documented():
  """A call that reads or writes a file (open, np.load/save, safetensors, json.dump) appears only
  in the modules the library's docstring names as its I/O."""
  found = set()
  for path in library_modules():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Call):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name in FILE_CALLS:
          found.add(str(path.relative_to(LIBRARY)))
  assert found == DOCUMENTED_IO
  docstring = ast.get_docstring(ast.parse((LIBRARY / "__init__.py").read_text()))
  for module in DOCUMENTED_IO:
    assert module.removesuffix(".py").replace("/", ".") in docstring


def test_the_runner_is_a_package_beside_the_library_and_no_library_module_is_left_behind():
  runner = ROOT / "experiments" / "runner"
  for name in ("train.py", "experiment.py", "config_validation.py", "methods.py", "workdir.py", "data/loader.py"):
    assert (runner / name).exists(), name
  for name in ("train.py", "methods.py", "config_validation.py", "pretrain.py", "reporting.py", "data"):
    assert not (LIBRARY / name).exists(), name
