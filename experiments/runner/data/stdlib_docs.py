"""The embedded text data: real English that ships with Python itself (no download, PSF license).

  instruction_records()  instruction / context / response / category records (Dolly-15k's
                         layout) made from the docstrings of the standard library: "What does
                         `math.gcd` do?" -> the docstring's first paragraph, its signature as
                         the context, its module group as the category (13 categories, about
                         500 records; clients partitioned by category differ as Dolly's do)
  pretraining_text()     the paragraphs of the Python Language Reference's topics that
                         `pydoc_data.topics` ships (about 460,000 characters), for the
                         embedded decoder's pretraining and its tokenizer

Generated sentences would teach a model a template; these are texts people wrote. The records
depend on the Python version's docstrings (the project's is 3.11); they are built in sorted
order, so a version gives the same records every time.
"""

from __future__ import annotations

import importlib
import inspect
import re

# category -> (module or type name, ...): a group of related APIs per category.
CATEGORIES = {
  "math": ("math", "cmath"),
  "statistics": ("statistics",),
  "random": ("random", "secrets"),
  "strings": ("str", "textwrap", "string"),
  "bytes": ("bytes", "base64", "binascii"),
  "containers": ("list", "dict", "set", "heapq", "bisect", "collections"),
  "paths": ("os.path", "glob", "fnmatch"),
  "files": ("shutil", "tempfile"),
  "time": ("time", "calendar"),
  "hashing": ("hashlib", "zlib"),
  "urls": ("urllib.parse",),
  "introspection": ("inspect",),
  "functional": ("functools", "itertools", "operator"),
}
BUILTIN_TYPES = {"str": str, "bytes": bytes, "list": list, "dict": dict, "set": set}
PHRASINGS = (
  "What does `{name}` do?",
  "Explain what the Python function {name} does.",
  "Describe `{name}` in one or two sentences.",
  "In Python, what is {name} for?",
)
MAX_RESPONSE_CHARS = 240
SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")
MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


def _summary(doc: str) -> str:
  """The docstring's first paragraph, whitespace collapsed, cut at a sentence (or word) end
  before MAX_RESPONSE_CHARS."""
  lines = doc.strip().split("\n")
  while lines and SIGNATURE_LINE.match(lines[0].strip()):  # Old-style "S.split(sep) -> list" lines.
    lines = lines[1:]
  text = " ".join("\n".join(lines).strip().split("\n\n")[0].split())
  if len(text) <= MAX_RESPONSE_CHARS:
    return text
  cut = text[:MAX_RESPONSE_CHARS]
  end = max(cut.rfind(". "), cut.rfind("; "))
  return cut[: end + 1] if end > 40 else cut[: cut.rfind(" ")] + " ..."


def _members(source: str) -> list[tuple[str, object]]:
  """(qualified name, callable) of a module's or builtin type's public functions, sorted."""
  owner = BUILTIN_TYPES.get(source) or importlib.import_module(source)
  out = []
  for name in sorted(dir(owner)):
    member = getattr(owner, name, None)
    if name.startswith("_") or not callable(member) or inspect.isclass(member):
      continue
    home = getattr(member, "__module__", None)
    if (
      inspect.ismodule(owner) and home not in (source, "_" + source, None) and not source.startswith(("os.", "urllib."))
    ):
      continue  # Re-exported from another module (counted where it lives).
    out.append((f"{source}.{name}", member))
  return out


def _signature(name: str, member: object) -> str:
  """`name(parameters)`, default values that are objects written without their memory address
  (`copy_function=<function copy2>`, not `<function copy2 at 0x7f...>`, which differs from one
  process to the next: the records, their tokens and every text run's numbers would too)."""
  try:
    return MEMORY_ADDRESS.sub(">", f"{name}{inspect.signature(member)}")
  except (TypeError, ValueError):  # Some builtins have none.
    return ""


def instruction_records() -> list[dict[str, str]]:
  """Dolly-layout records {"instruction", "context", "response", "category"}: one per public
  standard-library function with a docstring of 15+ characters, duplicates dropped."""
  records, seen = [], set()
  for category, sources in CATEGORIES.items():
    for source in sources:
      for name, member in _members(source):
        doc = inspect.getdoc(member) or ""
        response = _summary(doc)
        if len(response) < 15 or response in seen:
          continue
        seen.add(response)
        phrasing = PHRASINGS[len(records) % len(PHRASINGS)]
        records.append(
          {
            "instruction": phrasing.format(name=name),
            "context": _signature(name, member),
            "response": response,
            "category": category,
          }
        )
  return records


def pretraining_text() -> list[str]:
  """The Language Reference topics' paragraphs (whitespace collapsed, 40+ characters), in
  sorted topic order."""
  from pydoc_data.topics import topics

  paragraphs = []
  for topic in sorted(topics):
    for paragraph in re.split(r"\n\s*\n", topics[topic]):
      text = " ".join(paragraph.split())
      if len(text) >= 40:
        paragraphs.append(text)
  return paragraphs
