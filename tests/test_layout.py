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
DOCUMENTED_IO = {"peft.py", "autotune.py", "models/npz.py", "models/hf/", "plan.py", "files.py"}  # "x/": a package
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
  offenders = {
    str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.split(".")[0] == forbidden)
    for p in library_modules()
  }
  assert not {p: m for p, m in offenders.items() if m}


def test_the_library_core_does_not_import_the_model_zoo():
  """Tasks and HyperLoRA's signatures take the model's input convention as an argument."""
  core = [p for p in library_modules() if "models" not in p.relative_to(LIBRARY).parts]
  offenders = {
    str(p.relative_to(ROOT)) for p in core if any(m.startswith("hyperlora_jax.models") for m in imported_modules(p))
  }
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
          relative = str(path.relative_to(LIBRARY))
          found.add(next((p for p in DOCUMENTED_IO if p.endswith("/") and relative.startswith(p)), relative))
  assert found == DOCUMENTED_IO
  docstring = ast.get_docstring(ast.parse((LIBRARY / "__init__.py").read_text()))
  for module in DOCUMENTED_IO:
    assert module.removesuffix(".py").removesuffix("/").replace("/", ".") in docstring


def test_the_runner_is_a_package_beside_the_library_and_no_library_module_is_left_behind():
  runner = ROOT / "experiments" / "runner"
  for name in ("train.py", "experiment.py", "config_validation.py", "methods.py", "workdir.py", "data/loader.py"):
    assert (runner / name).exists(), name
  for name in ("train.py", "methods.py", "config_validation.py", "pretrain.py", "reporting.py", "data"):
    assert not (LIBRARY / name).exists(), name


def runner_import_graph() -> dict[str, set[str]]:
  """{runner module: the runner modules it imports anywhere in its file (functions included)}."""
  runner = ROOT / "experiments" / "runner"
  modules = {
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in runner.rglob("*.py")
  }
  graph = {}
  for name, path in modules.items():
    imported = imported_modules(path)
    graph[name] = {
      m
      for m in modules
      if m != name and (m in imported or any(i.startswith(m + ".") for i in imported)) and m != "experiments.runner"
    }
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for other in graph[node]:
      if other not in index:
        visit(other)
        low[node] = min(low[node], low[other])
      elif other in on_stack:
        low[node] = min(low[node], index[other])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for node in graph:
    if node not in index:
      visit(node)
  return found


def test_the_runners_imports_are_acyclic():
  """Read top down: leaf facts (`config_facts`), the shared parts (`assembly`), one builder per
  task, the dispatch (`experiment`), the loop (`train`); no module imports one that imports it,
  not even inside a function. (Seven modules formed one circle before.)"""
  graph = runner_import_graph()
  assert {"experiments.runner.train", "experiments.runner.assembly", "experiments.runner.config_facts"} <= set(graph)
  assert "experiments.runner.config_validation" in graph["experiments.runner.assembly"]  # The scan sees imports.
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # And finds a circle.
  assert cycles(graph) == []
  assert graph["experiments.runner.config_facts"] == set()


# The runner reads a config through typed values (`settings`, `configs.blocks`), unpacked once; the
# whole `ConfigDict` reaches only the modules about the config itself and these functions: the
# builders that unpack it, the steps that rewrite it before it is unpacked, and the loop's entry.
CONFIG_MODULES = ("config_facts", "config_validation", "settings", "workdir")
CONFIG_READERS = {
  "experiment.build_experiment",  # The dispatch to one builder.
  "image_experiment.build_image_experiment",  # The builders: unpack it into typed values.
  "text_experiment.build_text_experiment",
  "assembly.checked_method",  # Every check of the config, then the method it names.
  "methods.method_settings",  # The method's blocks, typed.
  "backbone.with_checkpoint_architecture",  # The config with a checkpoint's model.* ...
  "backbone._with_npz_pool",
  "text_experiment.build_text_federated_data",  # ... and a text run's data.num_clients.
  "text_experiment.with_clients_of",
  "text_experiment.prepare_text_inputs",  # A multi-process run's or a sweep's preparation.
  "train.train_and_evaluate",  # The entry point: prepare, build, workdir, title.
  "train._run",
  "train.prepare_once",
  "train.config_for_resume",
  "train.restore_checkpointed",  # Its twin for the commands that read a workdir (export, code_eval, mt_bench).
}


def config_taking_functions(source: str) -> set[str]:
  """The names of the functions in `source` with an argument named `config` or annotated as a
  `ConfigDict`."""
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
        annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
        if arg.arg == "config" or "ConfigDict" in annotation:
          found.add(getattr(node, "name", "<lambda>"))
  return found


def test_past_the_boundary_the_runner_takes_typed_settings_not_the_config():
  """A function that loads the backbone or data, builds or runs the round takes the typed values
  it needs; the whole `ConfigDict` stops at the config's own modules and `CONFIG_READERS` (84
  functions took it before)."""
  assert config_taking_functions("def f(a, config): ...\ndef g(x: ml_collections.ConfigDict): ...") == {"f", "g"}
  runner = ROOT / "experiments" / "runner"
  takers = set()
  for path in sorted(runner.rglob("*.py")):
    module = ".".join(path.relative_to(runner).with_suffix("").parts)
    if module not in CONFIG_MODULES:
      takers |= {f"{module}.{function}" for function in config_taking_functions(path.read_text())}
  assert takers == CONFIG_READERS


def test_configs_import_nothing_of_the_experiments():
  """`configs/` is read by the runner and by sweeps; it imports the library and its own
  modules, never `experiments/` (which imported back)."""
  offenders = {
    str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "experiments")
    for p in sorted((ROOT / "configs").glob("*.py"))
  }
  assert len(offenders) >= 9 and not {p: m for p, m in offenders.items() if m}


def test_the_facade_has_every_module_its_map_lists_and_tree_is_one_alias():
  """`hl.text`, `hl.tasks` and `hl.distributed` were listed in the map but raised AttributeError;
  `Tree = Any` was defined in 12 modules."""
  import hyperlora_jax as hl

  docstring = ast.get_docstring(ast.parse((LIBRARY / "__init__.py").read_text()))
  listed = [
    line.split()[0]
    for line in docstring.splitlines()
    if line.startswith("  ") and not line.startswith("   ") and line.split()
  ]
  assert {"lora", "federated", "text", "tasks", "distributed", "files", "pytree"} <= set(listed)
  assert [name for name in listed if not hasattr(hl, name)] == []
  defined = [
    str(p.relative_to(LIBRARY))
    for p in library_modules()
    if any(
      isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "Tree" for t in node.targets)
      for node in ast.parse(p.read_text()).body
    )
  ]
  assert defined == ["pytree.py"]


def test_experiments_are_sorted_by_kind():
  """Entry points at the top of experiments/ (and the CLI helpers they share), then the runner,
  reports and studies as packages; the benchmark scripts live beside their results in
  benchmarks/."""
  top = sorted(p.name for p in (ROOT / "experiments").glob("*.py"))
  assert top == ["__init__.py", "cli.py", "code_eval.py", "export.py", "main.py", "mt_bench.py", "plan.py", "sweep.py"]
  assert {p.name for p in (ROOT / "experiments").iterdir() if p.is_dir() and not p.name.startswith("__")} == {
    "reports",
    "runner",
    "studies",
  }
  assert {"round_speed.py", "text_round_speed.py", "gpu.sh", "round_speed.json"} <= {
    p.name for p in (ROOT / "benchmarks").iterdir()
  }


def _public_functions(path: pathlib.Path):
  """(qualified name, node) of the module's public functions and its public classes' public
  methods that take arguments (properties and argument-free methods say what they return in
  their one line)."""
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
      candidates = [(f"{node.name}.{f.name}", f) for f in node.body if isinstance(f, ast.FunctionDef)]
    elif isinstance(node, ast.FunctionDef):
      candidates = [(node.name, node)]
    else:
      continue
    for name, function in candidates:
      arguments = [a.arg for a in function.args.args + function.args.kwonlyargs if a.arg not in ("self", "cls")]
      decorators = {getattr(d, "id", getattr(d, "attr", "")) for d in function.decorator_list}
      if not name.split(".")[-1].startswith("_") and arguments and "property" not in decorators:
        yield name, function


def test_the_librarys_public_functions_document_their_arguments_or_returns():
  """Every public function of the library that takes arguments has an Args: or Returns:
  section (Google style, as optax and drjax); a new one without fails here, by name."""
  undocumented, counted = [], 0
  for path in library_modules():
    for name, function in _public_functions(path):
      counted += 1
      doc = ast.get_docstring(function) or ""
      if "Args:" not in doc and "Returns:" not in doc:
        undocumented.append(f"{path.relative_to(LIBRARY)}: {name}")
  assert counted > 250  # The scan sees the library (a broken walk would pass vacuously).
  assert not undocumented, undocumented
