"""The layout is the architecture: every module is on the map (docs/architecture.md), the map's layers are the
import contracts (.importlinter), and the contracts hold."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "spikeprune"
DOC = (ROOT / "docs" / "architecture.md").read_text()


def modules() -> list[Path]:
    """Every module and package of spikeprune, except the method files (one per method, listed by the registry)."""
    out = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG)
        if p.name in ("__init__.py", "__main__.py") or rel.parts[:2] == ("sparsity", "methods"):
            continue
        out.append(rel)
    return out


@pytest.mark.parametrize("rel", modules(), ids=str)
def test_every_module_is_on_the_map(rel):
    stem = rel.stem.lstrip("_") if rel.stem != "_ext" else "_ext"
    names = {f"`{rel.stem}`", f"`{stem}`", f"`{'/'.join(rel.with_suffix('').parts)}`"}
    if len(rel.parts) > 1:
        assert f"`{rel.parts[0]}/`" in DOC, f"package {rel.parts[0]}/ missing from docs/architecture.md"
    assert any(n in DOC for n in names), f"{rel} is not named in docs/architecture.md"


def test_every_package_is_on_the_map():
    for p in sorted(PKG.iterdir()):
        if p.is_dir() and (p / "__init__.py").exists():
            assert f"`{p.name}/`" in DOC or (p.name == "sparsity" and "`sparsity/" in DOC), p.name


def test_the_maps_layers_are_the_contracts():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".importlinter")
    layers = [line.strip() for line in cfg["importlinter:contract:layers"]["layers"].strip().splitlines()]
    for layer in layers:
        for mod in (m.strip() for m in layer.split("|")):
            short = mod.removeprefix("spikeprune.").replace(".", "/")
            assert f"`{short}`" in DOC or f"`{short}/`" in DOC, f"{mod} (a contract layer) is not on the map"
    # the map's table lists the layers in the contract's order
    rows = [int(m.group(1)) for m in re.finditer(r"^\| (\d+)\. ", DOC, re.M)]
    assert rows == list(range(1, len(rows) + 1)) and len(rows) >= 10


def test_import_contracts_hold():
    pytest.importorskip("importlinter")
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("lint-imports not on PATH")
    r = subprocess.run([exe, "--config", str(ROOT / ".importlinter")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "0 broken" in r.stdout


def test_the_repository_stands_alone():
    """No shipped file (docs, configs, results, code) points into the design folder outside the repository."""
    needle = "../" + "shared"
    hits = [str(p.relative_to(ROOT)) for d in ("src", "docs", "configs", "benchmarks", "README.md")
            for p in ([ROOT / d] if (ROOT / d).is_file() else (ROOT / d).rglob("*"))
            if p.is_file() and p.suffix in (".md", ".py", ".yaml", ".yml", ".sh", ".txt", ".csv")
            and needle in p.read_text(errors="ignore")]
    assert not hits, f"files citing {needle}: {hits}"
