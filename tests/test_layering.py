"""The layering the design asks for, checked on the source: pkramfs uses kexec_sim only through
its public surface (``kexec_sim/__init__.py``), and kexec_sim never imports pkramfs."""

import ast
import importlib

import kexec_sim

from .util import REPO


def _imports(package: str) -> list[tuple[str, str, list[str]]]:
    """(file, module, names) of every ``from ... import`` in *package*'s modules."""
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.append(
                    (str(path.relative_to(REPO)), node.module, [a.name for a in node.names])
                )
            elif isinstance(node, ast.Import):
                found += [(str(path.relative_to(REPO)), a.name, []) for a in node.names]
    return found


def test_pkramfs_imports_only_the_public_surface_of_kexec_sim() -> None:
    private = [
        (where, module) for where, module, _ in _imports("pkramfs")
        if module.startswith("kexec_sim.")
    ]  # fmt: skip
    assert private == []
    used = {
        name for _, module, names in _imports("pkramfs") if module == "kexec_sim" for name in names
    }
    assert used <= set(kexec_sim.__all__), used - set(kexec_sim.__all__)


def test_the_lazy_public_surface_names_each_name_where_it_lives() -> None:
    """kexec_sim imports its public names on first use: the imports its TYPE_CHECKING block
    shows type checkers are the names ``_PUBLIC`` imports at run time, and ``__all__``."""
    tree = ast.parse((REPO / "kexec_sim" / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If))
    typed = {
        (node.module, alias.name)
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    lazy = {
        (f"kexec_sim.{module}", name)
        for module, names in kexec_sim._PUBLIC.items()
        for name in names
    }
    assert typed == lazy
    assert sorted(name for _, name in lazy) == sorted(kexec_sim.__all__)
    for module, name in sorted(lazy):
        assert getattr(kexec_sim, name) is getattr(importlib.import_module(module), name)


def test_kexec_sim_never_imports_pkramfs() -> None:
    assert [
        (where, module) for where, module, _ in _imports("kexec_sim")
        if module == "pkramfs" or module.startswith("pkramfs.")
    ] == []  # fmt: skip


def test_no_test_module_imports_another() -> None:
    tests = [
        (where, module) for where, module, _ in _imports("tests")
        if module.startswith(("tests.test_", ".test_")) or module.startswith("test_")
    ]  # fmt: skip
    assert tests == []
