"""The shape of the tree: the book at the top level, lib/ below it, the workshop beside it.

The book (the eight chapters of the paper's path) imports only itself and lib/; lib/ imports
nothing of the project but lib/; a chapter reaches the workshop only from its command line
(train.py builds the demo when no weights are given). The README's reading order is the book.
"""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOK = ["vision", "cmoe", "lora", "model", "data", "train", "evaluate", "metrics"]  # the reading order
LIB = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "lib")) if f.endswith(".py") and f != "__init__.py")
WORKSHOP = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "workshop"))
                  if f.endswith(".py") and f != "__init__.py")


def project_imports(path: str) -> list[tuple[str, str]]:
    """(imported project module, the function it is imported in or "" at module level) for one file."""
    tree = ast.parse(open(path).read(), path)
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            for name in names:
                top = name.split(".")[0]
                if top in BOOK or (top in ("lib", "workshop") and name.count(".") == 1):
                    found.append((name, function))
            visit(child, inner)
    visit(tree, "")
    return found


def test_the_top_level_is_the_book():
    tops = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
    assert tops == sorted(BOOK)


def test_the_book_reads_in_one_sitting():
    lines = {name: len(open(os.path.join(ROOT, f"{name}.py")).read().splitlines()) for name in BOOK}
    assert max(lines.values()) <= 650, lines
    assert sum(lines.values()) <= 3000, lines


@pytest.mark.parametrize("name", BOOK)
def test_a_chapter_imports_the_book_and_lib_only(name):
    for module, function in project_imports(os.path.join(ROOT, f"{name}.py")):
        top = module.split(".")[0]
        if top == "workshop":  # only a command line may reach the workshop, where its command needs it
            assert function == "main", f"{name}.py imports {module} in {function or 'the module'}"
        else:
            assert top in BOOK + ["lib"], f"{name}.py imports {module}"
            assert top != name


@pytest.mark.parametrize("name", LIB)
def test_lib_imports_nothing_above_it(name):
    for module, _ in project_imports(os.path.join(ROOT, "lib", f"{name}.py")):
        assert module.startswith("lib."), f"lib/{name}.py imports {module}"


def test_the_book_imports_no_cycle():
    graph = {name: {m.split(".")[0] for m, _ in project_imports(os.path.join(ROOT, f"{name}.py"))} & set(BOOK)
             for name in BOOK}
    done, order = set(), []

    def walk(name, path):
        assert name not in path, f"import cycle: {' -> '.join(path + [name])}"
        if name not in done:
            for dep in sorted(graph[name]):
                walk(dep, path + [name])
            done.add(name)
            order.append(name)
    for name in BOOK:
        walk(name, [])


def test_every_workshop_command_runs_as_a_module_and_is_in_the_readme():
    readme = open(os.path.join(ROOT, "README.md")).read()
    helpers = {"plot", "hf", "ops"}  # drawing, HF-format writing, op counting: used by the commands and bench
    for name in WORKSHOP:
        source = open(os.path.join(ROOT, "workshop", f"{name}.py")).read()
        if name in helpers:
            assert '__name__ == "__main__"' not in source
            continue
        assert '__name__ == "__main__"' in source, f"workshop/{name}.py is not a command"
        assert f"python -m workshop.{name}" in readme, f"the README does not show python -m workshop.{name}"


def test_the_readme_reading_order_is_the_book():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Reading order", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^\| `(\w+)\.py` \|", section, re.M) == BOOK
