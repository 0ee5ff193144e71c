"""The package's folders are its architecture: imports only point down these layers, and no module
imports itself back through others."""

import ast
import os

from conftest import REPO

PACKAGE = os.path.join(REPO, "dalle_jax")
# Lowest first: a module may import from its own layer (within its own group) or any layer below.
LAYERS = (
    ("data", "tokenizer", "sharding", "image_grid", "plots", "user_input"),
    ("train",),
    ("dvae", "rerank"),
    ("transformer",),
    ("generate", "scaling"),
    ("evaluation",),
)
LAYER = {group: depth for depth, groups in enumerate(LAYERS) for group in groups}


def module_imports() -> dict[str, set[str]]:
  """dalle_jax module name -> the dalle_jax modules it imports (`from a import b` counts b when
  b is a module)."""
  modules = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  graph = {}
  for module, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dalle_jax"):
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          imported.add(full if full in modules else node.module)
      elif isinstance(node, ast.Import):
        imported.update(a.name for a in node.names if a.name.startswith("dalle_jax"))
    graph[module] = imported - {module, "dalle_jax"}
  return graph


def group(module: str) -> str:
  return module.split(".")[1]


def test_every_group_has_a_layer():
  groups = {group(m) for m in module_imports() if m != "dalle_jax"}
  assert groups == set(LAYER), "add the new module or folder to LAYERS"


def test_imports_point_down_the_layers():
  upward = [(m, i) for m, imported in module_imports().items() if m != "dalle_jax"
            for i in imported if LAYER[group(i)] > LAYER[group(m)]
            or (LAYER[group(i)] == LAYER[group(m)] and group(i) != group(m)
                and LAYER[group(m)] > 0)]
  assert not upward, upward


def test_no_import_cycles():
  graph = module_imports()
  state = {}

  def visit(module, path):
    state[module] = "open"
    for child in graph.get(module, ()):
      assert state.get(child) != "open", " -> ".join(path + [child])
      if child not in state:
        visit(child, path + [child])
    state[module] = "done"

  for module in graph:
    if module not in state:
      visit(module, [module])
