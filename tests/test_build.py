"""Packaging: the optional extension, import without it, the layering rule of reference.py."""

import ast
import pathlib
import subprocess
import sys

import grpo_kernels as gk

PACKAGE = pathlib.Path(gk.__file__).parent


def test_version():
    assert gk.__version__.count(".") == 2


def test_extension_reports_the_package_version():
    info = gk.extension_info()
    if not gk.extension_available():
        assert info == {}
        return
    assert info["version"] == gk.__version__
    assert info["cuda"] == (info["cuda_version"] > 0)


def test_import_without_extension():
    """The package imports and runs with grpo_kernels._C unavailable (GRPO_KERNELS_NO_EXT=1 builds)."""
    code = (
        "import sys; sys.modules['grpo_kernels._C'] = None\n"
        "import torch, grpo_kernels as gk\n"
        "assert not gk.extension_available() and gk.extension_info() == {}\n"
        "out = gk.grpo_loss(-torch.rand(2, 3), None, torch.randn(2), torch.ones(2, 3))\n"
        "print('ok', gk.available_backends())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_reference_imports_only_torch():
    """The spec imports torch and the spec's tables (loss_table.py, standard library only), nothing else."""
    tree = ast.parse((PACKAGE / "reference.py").read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 or node.module == "loss_table", "reference.py imports only loss_table from the package"
            modules.add(node.module.split(".")[0] if node.level == 0 else "." + node.module)
    assert modules <= {"torch", "typing", "__future__", ".loss_table"}, modules
