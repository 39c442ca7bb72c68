"""The package's plan: an acyclic import graph, no project import hidden in a function, one
stage contract."""

import ast
import inspect
import os
import subprocess
import sys

from diverse_cfg import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'diverse_cfg'


def _modules() -> dict[str, str]:
  """dotted module name -> file, for every module of the package."""
  out = {}
  for d, _, files in os.walk(os.path.join(REPO, PACKAGE)):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(d, f), REPO)[:-3].replace(os.sep, '.')
        out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = os.path.join(d, f)
  return out


def _targets(node: ast.AST, modules) -> list[str]:
  """The package modules an import statement loads."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name in modules]
  if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] == PACKAGE:
    subs = [f'{node.module}.{a.name}' for a in node.names]
    return [s for s in subs if s in modules] or [node.module]
  return []


def imports_of(modules) -> tuple[dict[str, set], list[str]]:
  """(module -> package modules it imports at module level, imports found inside functions)."""
  graph, hidden = {}, []
  for name, path in modules.items():
    tree = ast.parse(open(path).read(), path)
    graph[name] = {t for node in tree.body for t in _targets(node, modules)}
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        hidden += [f'{name}.{fn.name} imports {t}' for node in ast.walk(fn)
                   for t in _targets(node, modules)]
  return graph, hidden


def find_cycle(graph: dict[str, set]) -> list[str] | None:
  state, stack = {}, []

  def visit(n):
    state[n] = 'open'
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == 'open':
        return stack[stack.index(m):] + [m]
      if m not in state and (cycle := visit(m)):
        return cycle
    state[n] = 'done'
    stack.pop()
    return None

  for n in sorted(graph):
    if n not in state and (cycle := visit(n)):
      return cycle
  return None


def test_cycle_finder_finds_a_planted_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) is None


def test_import_graph_is_acyclic_with_no_project_imports_inside_functions():
  modules = _modules()
  graph, hidden = imports_of(modules)
  assert graph['diverse_cfg.evaluate'] >= {'diverse_cfg.measure', 'diverse_cfg.report'}  # parsed
  assert not hidden, hidden
  assert find_cycle(graph) is None, find_cycle(graph)


def test_every_stage_is_run_config_workdir():
  for name, run in main.STAGES.items():
    params = list(inspect.signature(run).parameters)
    assert params[:3] == ['config', 'workdir', 'devices'], (name, params)


def test_a_users_mistake_at_the_command_line_is_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  cases = {'no checkpoint directory at': ['--stage=sample', f'--checkpoint={tmp_path / "none"}'],
           'config.model.d_model=-3: must be positive': [
               '--stage=pretrain', '--config=configs/essen.py:smoke', f'--workdir={tmp_path}',
               '--config.model.d_model=-3']}
  for expected, args in cases.items():
    proc = subprocess.run([sys.executable, '-m', 'diverse_cfg.main', *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], proc.stdout[-1000:] + proc.stderr[-2000:]
