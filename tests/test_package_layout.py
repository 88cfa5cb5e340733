"""The package's structure rules, checked on its source (issue 14's gates).

* no import cycle between modules of ``lora_muon_jax``, ``lora_muon_jax_examples``,
  ``benchmarks`` (``benchmarks/study/`` included) and ``examples/``, within each and
  across them (module-level imports and imports inside functions alike; imports under
  ``if TYPE_CHECKING:`` are for annotations only, never run, and are not counted);
* ``flax`` is imported only under ``lora_muon_jax/nnx/``: the optimizer library runs
  without it (checked with flax blocked, in a subprocess), and flax is an extra of
  ``pyproject.toml``, not a dependency;
* no function in those four trees is longer than 80 lines of code (docstring, blank
  and comment-only lines not counted).

Each rule is also checked on a small synthetic package, so a broken checker fails.
"""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys
import textwrap
import tomllib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lora_muon_jax"
# Every tree of source the layout rules cover: the library, the example package, the
# benchmarks (with ``benchmarks/study/``) and the example scripts.
SOURCE_ROOTS = [PACKAGE] + [
    PACKAGE.parent / name for name in ("lora_muon_jax_examples", "benchmarks", "examples")
]
MAX_CODE_LINES = 80


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """The nodes of ``tree`` outside the bodies of ``if TYPE_CHECKING:`` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if id(n) not in skipped]


def _imports(
    path: pathlib.Path, root: pathlib.Path, packages: frozenset[str] = frozenset()
) -> set[str]:
    """Modules of the package (or of ``packages``) that ``path`` imports (absolute or
    relative)."""
    packages = packages | {root.name}
    here = _module_name(path, root)
    is_init = path.name == "__init__.py"
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in packages}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[
                    : len(here.split(".")) - node.level + (1 if is_init else 0)
                ]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] not in packages:
                continue
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def import_graph(*roots: pathlib.Path) -> dict[str, set[str]]:
    """Module → package modules it imports (names that are not modules dropped).

    Given several roots, one graph over all of them: edges between them count too.
    """
    packages = frozenset(root.name for root in roots)
    files = {_module_name(p, root): (p, root) for root in roots for p in root.rglob("*.py")}
    return {
        m: {i for i in _imports(p, root, packages) if i in files and i != m}
        for m, (p, root) in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules), ignoring edges into a package's own
    ``__init__`` from its children (``from pkg import x`` inside ``pkg``)."""
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if node.startswith(nxt + "."):  # child importing its parent package
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*stack, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def flax_importers(root: pathlib.Path) -> list[str]:
    allowed = root / "nnx"
    bad = []
    for path in root.rglob("*.py"):
        if allowed in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "flax" or n.startswith("flax.") for n in names):
                bad.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return bad


def code_lines(node: ast.AST, lines: list[str]) -> int:
    """Lines of code of a function: no docstring, blank or comment-only lines."""
    body = getattr(node, "body", [])
    doc: set[int] = set()
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(getattr(body[0], "value", None), ast.Constant)
    ):
        if isinstance(body[0].value.value, str):
            doc = set(range(body[0].lineno, body[0].end_lineno + 1))
    count = 0
    for i in range(node.lineno, node.end_lineno + 1):
        text = lines[i - 1].strip()
        if i not in doc and text and not text.startswith("#"):
            count += 1
    return count


def long_functions(root: pathlib.Path, limit: int = MAX_CODE_LINES) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        src = path.read_text()
        lines = src.splitlines()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = code_lines(node, lines)
                if n > limit:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({n})")
    return out


CONTRIBUTING = PACKAGE.parent / "CONTRIBUTING.md"  # its Layout section names every module


def layout_section(doc: pathlib.Path) -> str:
    text = doc.read_text()
    start = text.index("## Layout")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def layout_mismatches(section: str, roots: list[pathlib.Path]) -> list[str]:
    """Modules the Layout section does not name, and paths it names that don't exist.

    A module counts as named by its path from the repository root, or (inside a
    subpackage line) by its file name, or through its subpackage's folder name.
    """
    out = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root.parent).as_posix()
            folder = f"{path.parent.name}/"
            if path.parent != root and path.name == "__init__.py":
                continue
            in_subpackage = path.parent != root and folder in section
            if rel not in section and path.name not in section and not in_subpackage:
                out.append(f"not in the Layout section: {rel}")
    names = "|".join(re.escape(root.name) for root in roots)
    for ref in re.findall(rf"`((?:{names})/[\w./]*)`", section):
        if not (roots[0].parent / ref).exists():
            out.append(f"the Layout section names a missing path: {ref}")
    return out


def _root_id(root: pathlib.Path) -> str:
    return root.name


@pytest.mark.parametrize("root", SOURCE_ROOTS, ids=_root_id)
def test_no_import_cycles(root):
    assert find_cycle(import_graph(root)) is None, find_cycle(import_graph(root))


def test_no_import_cycles_across_trees():
    graph = import_graph(*SOURCE_ROOTS)
    assert find_cycle(graph) is None, find_cycle(graph)


def test_flax_only_under_nnx():
    assert flax_importers(PACKAGE) == []


# Blocks flax (``import flax`` raises ModuleNotFoundError), then imports the library.
_WITHOUT_FLAX = textwrap.dedent(
    """
    import sys

    sys.modules["flax"] = None
    import jax.numpy as jnp

    import lora_muon_jax as lmj
    import lora_muon_jax.lora_scale, lora_muon_jax.peft_io, lora_muon_jax.peers
    import lora_muon_jax.testing

    params = {"lora_a": jnp.ones((4, 2)).at[0, 1].set(2.0), "lora_b": jnp.ones((2, 3))}
    tx = lmj.lora_muon(0.1)
    tx.update(params, tx.init(params), params)
    try:
        import lora_muon_jax.nnx
    except ModuleNotFoundError as err:
        print("ERROR:", err)
    assert sys.modules["flax"] is None
    """
)


def test_library_imports_without_flax_and_nnx_names_the_extra():
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_FLAX],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PACKAGE.parent,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ERROR: lora_muon_jax.nnx needs flax" in proc.stdout, proc.stdout
    assert 'pip install "lora_muon_jax[flax]"' in proc.stdout


def test_flax_is_an_extra_not_a_dependency():
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]

    def needs_flax(reqs: list[str]) -> bool:
        return any(re.match(r"flax\b", r) for r in reqs)

    assert not needs_flax(project["dependencies"])
    extras = project["optional-dependencies"]
    assert [name for name in sorted(extras) if needs_flax(extras[name])] == [
        "dev",
        "examples",
        "flax",
        "study",
    ]


def test_one_repository_url_in_pyproject_readme_and_notebook():
    root = PACKAGE.parent
    url = tomllib.loads((root / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    readme = (root / "README.md").read_text()
    assert f"git clone {url} " in readme and f'pip install "git+{url}"' in readme
    assert f'\\"{url}\\"' in (root / "notebooks" / "quickstart.ipynb").read_text()
    # No other repository URL anywhere in those three files.
    others = set(re.findall(r"https://github\.com/[\w.-]+/lora_muon_jax\b", readme)) - {url}
    assert not others


@pytest.mark.parametrize("root", SOURCE_ROOTS, ids=_root_id)
def test_no_function_longer_than_80_code_lines(root):
    assert long_functions(root) == []


def test_contributing_layout_names_every_module():
    roots = [PACKAGE, PACKAGE.parent / "lora_muon_jax_examples"]
    assert layout_mismatches(layout_section(CONTRIBUTING), roots) == []


@pytest.fixture
def toy(tmp_path):
    pkg = tmp_path / "toy"
    (pkg / "nnx").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from toy import a\n")
    (pkg / "a.py").write_text("from toy import b\n")
    (pkg / "b.py").write_text("def f():\n    from toy import a  # a cycle through a function\n")
    (pkg / "c.py").write_text("import flax.nnx\n")
    # ``f`` imports ``e`` back for annotations only: no cycle, the import never runs.
    (pkg / "e.py").write_text("from toy import f\n")
    (pkg / "f.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from toy import e\n"
    )
    (pkg / "nnx" / "__init__.py").write_text("from flax import nnx\n")
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_CODE_LINES + 1))
    (pkg / "d.py").write_text(f'def long():\n    """Doc.\n\n    More doc.\n    """\n{body}\n')
    return pkg


def test_layout_check_sees_missing_and_stale_entries(toy):
    section = "## Layout\n* `toy/a.py`: a.\n* `toy/gone.py`: removed.\n"
    found = layout_mismatches(section, [toy])
    assert "not in the Layout section: toy/b.py" in found
    assert "the Layout section names a missing path: toy/gone.py" in found
    assert "not in the Layout section: toy/a.py" not in found


def test_checkers_catch_what_they_look_for(toy):
    assert find_cycle(import_graph(toy)) in (
        ["toy.a", "toy.b", "toy.a"],
        ["toy.b", "toy.a", "toy.b"],
    )
    graph = import_graph(toy)
    assert "toy.f" in graph["toy.e"] and graph["toy.f"] == set()
    assert flax_importers(toy) == ["toy/c.py:1"]
    assert long_functions(toy) == [f"toy/d.py:1 long ({MAX_CODE_LINES + 2})"]
