"""Security: hostile file names never escape the output folder nor break partition keys; weights
load with `weights_only=True` or safetensors only (a pickled payload never runs); plugins come only
from explicit paths and installed entry points; services bind 127.0.0.1."""

from __future__ import annotations

import ast
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from . import util

PKG = util.REPO / "atlaspatch_assets"
SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HOSTILE = [
    "a|b.svs",
    "a,b.svs",
    "[x].svs",
    "ünïcødé-切片.svs",
    "x" * 246 + ".svs",  # 250 characters
    "切" * 80 + ".svs",  # 244 bytes of UTF-8
    "new\nline.svs",
    "tab\there.svs",
    "...svs",
    "..svs",
    ".hidden.svs",
    "-rf.svs",
    "a b.svs",
    "$(touch pwned).svs",
    "quote'\"`.svs",
    "back\\slash.svs",
    "%2e%2e%2f.svs",
    "x.svs.svs",
    "emoji😀.svs",
    "CON.svs",
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_hostile_names_stay_inside_the_output_and_make_safe_keys(
    tmp_path: Path, small_slide: Path, monkeypatch: pytest.MonkeyPatch, report: Any
) -> None:
    from dagster import DagsterInstance

    from atlaspatch_assets.cli import main

    src = small_slide
    inp = tmp_path / "in"
    (inp / "sub").mkdir(parents=True)
    (inp / "other").mkdir()
    files = [inp / n for n in HOSTILE]
    for f in files:
        shutil.copyfile(src, f)
    # the same stem in two folders, a '..' in the given path, and a link to a file outside
    shutil.copyfile(src, inp / "other" / "a,b.svs")
    files.append(inp / "other" / "a,b.svs")
    files.append(inp / "sub" / ".." / "other" / ".." / "twice.svs")
    shutil.copyfile(src, inp / "twice.svs")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(src, outside / "target.svs")
    (inp / "link.svs").symlink_to(outside / "target.svs")
    files.append(inp / "link.svs")
    out, home = tmp_path / "out", tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    args = ["segment-and-get-coords", *map(str, files), "--patch-size", "224", "--target-mag", "20", "-o", str(out)]
    args += ["--visualize-grids", "--visualize-mask", "--visualize-contours", "--save-images"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output[-3000:]
    # nothing written outside the output (and the instance), nothing through a link out of it
    created = _tree(tmp_path) - before
    escaped = [p for p in created if not p.startswith(("out", "home"))]
    assert escaped == [] and not (tmp_path / "pwned").exists()
    for p in out.rglob("*"):
        assert os.path.realpath(p).startswith(str(out) + os.sep), p
        assert not p.is_symlink(), p
    ids = util.slide_paths(out)
    with DagsterInstance.from_config(str(home)) as instance:
        keys = instance.get_dynamic_partitions("slides")
    bad_keys = [k for k in [*ids, *keys] if not SAFE_KEY.match(k) or ".." in k or len(k) > 100]
    bad_keys += [k for k in keys if any(c in k for c in "|,[]/")]
    assert sorted(keys) == sorted(ids) and not bad_keys, bad_keys
    assert len(ids) == len(files)  # distinct names never collapse onto one key
    assert {os.path.realpath(p) for p in ids.values()} == {os.path.realpath(f) for f in files}
    run = out / "20x_224px_0px_overlap"
    for sid in ids:  # every output of each slide is inside the run folder, named by its key
        for p in (run / "patches" / f"{sid}.h5", run / "masks" / f"{sid}.geojson", run / "images" / sid):
            assert p.exists(), p
    rows = [(repr(Path(p).name)[:40], sid[:60]) for sid, p in sorted(ids.items(), key=lambda kv: kv[1])]
    report.table("hostile names → slide ids (partition keys)", ("file", "slide id"), rows)
    report.add("security", "hostile names tried / escaped or unsafe keys", f"{len(files)} / 0")


_EVIL = """
import os, sys, torch
class Evil:
    def __reduce__(self):
        return (os.mkdir, (sys.argv[2],))
torch.save({"state_dict": {"w": Evil()}}, sys.argv[1])
"""


def test_pickled_code_in_a_checkpoint_never_runs(tmp_path: Path, small_slide: Path, report: Any) -> None:
    """A checkpoint whose unpickling would run code (here: create a folder) is refused by every
    loader that reads user files: patch encoder weights, SAM2 and MOOZY checkpoints."""
    import subprocess
    import sys

    from atlaspatch_assets.core.encoders.weights import ResolvedWeights, WeightsLoadError, load_state_dict_file

    evil, marker = tmp_path / "evil.pt", tmp_path / "PWNED"
    subprocess.run([sys.executable, "-c", _EVIL, str(evil), str(marker)], check=True, env=util.env())
    assert evil.exists() and not marker.exists()
    tried = []
    with pytest.raises(WeightsLoadError, match="weights-only"):
        load_state_dict_file(evil)
    tried.append("patch encoder weights (load_state_dict_file)")
    from atlaspatch_assets.core.slide_encoders.moozy import _load_payload

    with pytest.raises(WeightsLoadError, match="weights_only"):
        _load_payload(ResolvedWeights(evil, "explicit"))
    tried.append("moozy checkpoint")
    try:
        from atlaspatch_assets.core.segmentation.sam2 import _build
    except ImportError:  # pragma: no cover - the dev install has sam2
        _build = None
    if _build is not None:
        from atlaspatch_assets.core.errors import SegmentationError

        with pytest.raises(SegmentationError, match="weights_only"):
            _build("configs/sam2.1/sam2.1_hiera_t.yaml", str(evil), "cpu")
        tried.append("sam2 checkpoint")
    # end to end: the CLI with the evil file as mobilenet_v2's weights fails that slide, runs nothing
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copyfile(small_slide, inp / "s.svs")
    proc = util.run(
        util.cli_cmd(
            "process", str(inp), "--patch-size", "224", "--target-mag", "20", "--feature-extractors", "mobilenet_v2"
        )
        + ["--encoder-weights", f"mobilenet_v2={evil}", "-o", str(tmp_path / "out")],
        util.env(),
    )
    assert proc.returncode in (1, 2), proc.stderr[-2000:]
    assert "weights-only" in proc.stderr or "weights_only" in proc.stderr, proc.stderr[-2000:]
    tried.append("CLI --encoder-weights")
    assert not marker.exists()
    report.add("security", "hostile checkpoints tried / code executed", f"{len(tried)} / 0")


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_every_checkpoint_load_in_the_code_is_weights_only() -> None:
    """No `torch.load` without `weights_only=True`, and no pickle-based loader, anywhere in the package."""
    bad = []
    for path in PKG.rglob("*.py"):
        for call in _calls(ast.parse(path.read_text(), str(path))):
            name = _name(call.func)
            kw = {k.arg: k.value for k in call.keywords}
            where = f"{path.relative_to(util.REPO)}:{call.lineno} {name}"
            if name.endswith("torch.load") or name == "load" and "weights_only" in kw:
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    bad.append(where)
            if name in (
                "pickle.load",
                "pickle.loads",
                "dill.load",
                "joblib.load",
                "torch.jit.load",
                "cloudpickle.load",
            ):
                bad.append(where)
            if name.endswith("np.load") or name.endswith("numpy.load"):
                v = kw.get("allow_pickle")
                if v is not None and not (isinstance(v, ast.Constant) and v.value is False):
                    bad.append(where)
    assert bad == []


_PLUGIN = """
import os
open(os.environ["PLUGIN_MARKER"], "a").write("imported\\n")

def register_feature_extractors(registry, device, dtype, num_workers):
    from atlaspatch_assets.core.encoders.plugins import register_custom_encoder
    import torch
    register_custom_encoder(registry=registry, name="evil_enc", embedding_dim=3,
                            loader=lambda d, t: torch.nn.AdaptiveAvgPool2d(1))
"""

_PROBE = """
import sys
from atlaspatch_assets.core.encoders import encoder_registry
reg = encoder_registry(tuple(sys.argv[1:]))
print("evil_enc" in reg)
"""


def test_plugins_load_only_from_explicit_paths_and_entry_points(tmp_path: Path, report: Any) -> None:
    """A plugin file lying in the working directory, the weights dir or on PYTHONPATH is never
    imported; given explicitly it is (and its code runs: plugins are code, as entry points are)."""
    marker = tmp_path / "marker"
    weights = tmp_path / "weights"
    weights.mkdir()
    for d in (tmp_path, weights):
        for name in ("plugin.py", "atlaspatch_plugin.py", "register_feature_extractors.py", "conftest.py"):
            (d / name).write_text(_PLUGIN)
    e = util.env(PLUGIN_MARKER=str(marker), ATLASPATCH_WEIGHTS_DIR=str(weights), ATLASPATCH_FEATURE_PLUGINS="plugin.py")
    e["PYTHONPATH"] += os.pathsep + str(tmp_path)
    import subprocess
    import sys

    implicit = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=tmp_path, env=e, capture_output=True, text=True, timeout=300
    )
    assert implicit.returncode == 0, implicit.stderr[-2000:]
    assert implicit.stdout.strip() == "False" and not marker.exists()
    explicit = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path / "plugin.py")],
        cwd=tmp_path,
        env=e,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert explicit.returncode == 0, explicit.stderr[-2000:]
    assert explicit.stdout.strip() == "True" and marker.read_text() == "imported\n"
    # the documentation says that plugins and installed entry points run code
    readme = (util.REPO / "README.md").read_text()
    assert re.search(r"entry points?.{0,200}run.{0,40}code|run.{0,40}code.{0,200}entry points?", readme, re.S | re.I)
    # the one configured source besides explicit flags: absolute paths in $ATLASPATCH_FEATURE_PLUGINS
    assert re.search(r"ATLASPATCH_FEATURE_PLUGINS.{0,80}absolute", readme, re.S)
    from atlaspatch_assets.core.stages.compute import plugins_from_env

    os.environ["ATLASPATCH_FEATURE_PLUGINS"] = "plugin.py"
    try:
        with pytest.raises(ValueError, match="absolute paths"):
            plugins_from_env()
    finally:
        del os.environ["ATLASPATCH_FEATURE_PLUGINS"]
    report.add("security", "implicit plugin locations tried / loaded", "4 names x 3 places / 0")


SERVICE = re.compile(r"(dagster(?:-webserver| dev| api grpc| code-server start)|dagster-daemon)\b([^\n`]*)")


def test_services_bind_loopback_only() -> None:
    """Every documented or scripted webserver/code server binds 127.0.0.1 (explicitly, or by the
    installed Dagster's default, which is checked too); nothing binds 0.0.0.0."""
    import dagster_webserver.cli as web

    assert web.DEFAULT_WEBSERVER_HOST == "127.0.0.1"
    files = [util.REPO / "Makefile", util.REPO / "README.md", util.REPO / "dagster.yaml", util.REPO / "workspace.yaml"]
    files += [p for p in (util.REPO / "resources").rglob("*") if p.is_file()]
    files += [p for p in (util.REPO / "tests" / "e2e").rglob("*.py")] + [util.REPO / ".ci" / "run"]
    files += list((util.REPO / "benchmarks").rglob("*.py"))
    commands = []
    for f in files:
        text = f.read_text(errors="replace")
        assert "0.0.0.0" not in text and "::/0" not in text, f
        for m in SERVICE.finditer(text):
            args = m.group(2)
            host = re.search(r"(?:-h|--host|--dagit-host)[ =,\"']+([\w.:\[\]-]+)", args)
            commands.append((f.name, m.group(0).strip()[:80]))
            if host:
                assert host.group(1).strip("\"'") in ("127.0.0.1", "localhost"), (f, m.group(0))
    assert commands  # the Makefile and the e2e stack start services
