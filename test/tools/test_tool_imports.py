"""The offline tools import each other in one direction: no cycle, lazy imports included.

Read from the source with ``ast`` (an import inside a function counts: it is a cycle that only
waits for its call). Issue 23: ``bag`` and ``fleet`` imported each other.
"""

import ast
from pathlib import Path
from typing import Dict, List, Set

TOOLS = Path(__file__).resolve().parents[2] / 'metricgold_ros' / 'tools'
PACKAGE = 'metricgold_ros.tools'


def tool_imports() -> Dict[str, Set[str]]:
    """Module name -> the tools modules it imports (anywhere in its source)."""
    names = {path.stem for path in TOOLS.glob('*.py')}
    graph: Dict[str, Set[str]] = {}
    for path in TOOLS.glob('*.py'):
        found: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == PACKAGE:
                    found.update(alias.name for alias in node.names if alias.name in names)
                elif node.module.startswith(PACKAGE + '.'):
                    found.add(node.module.split('.')[2])
            elif isinstance(node, ast.Import):
                found.update(alias.name.split('.')[2] for alias in node.names
                             if alias.name.startswith(PACKAGE + '.'))
        graph[path.stem] = found - {path.stem}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every elementary cycle's smallest-first rotation (depth-first search)."""
    found = set()

    def visit(start: str, node: str, path: List[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                found.add(tuple(path))
            elif nxt not in path and nxt > start:
                visit(start, nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, start, [start])
    return [list(c) for c in sorted(found)]


def test_tools_have_no_import_cycle():
    graph = tool_imports()
    assert 'bag_convert' in graph['fleet_workers']  # the graph is read (a sanity check)
    assert cycles(graph) == []


def test_the_signal_helpers_have_one_owner():
    owners = [path.stem for path in TOOLS.glob('*.py')
              if 'def sigterm_as_interrupt' in path.read_text()
              or 'def _sigterm_as_interrupt' in path.read_text()
              or 'def _interrupts_deferred' in path.read_text()
              or 'def interrupts_deferred' in path.read_text()]
    assert owners == ['signals']
