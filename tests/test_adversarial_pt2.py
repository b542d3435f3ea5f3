"""Crafted ``.pt2`` archives against the allow-list of ``runtimes.pt2_archive``, and the one module that loads
untrusted torch files (``runtimes.safe_load``).

``torch.export.load`` loads every entry under ``models/`` as a program (``models/evil_json`` is a program
``evil``), each with its own parts, and unpickles a legacy ``data/constants/<program>.pt`` fully: the first
test's archive ran code on the code before the allow-list, which only looked at ``models/*.json``. Every
crafted pickle would create a marker file when unpickled; the tests assert that the marker was *not* created.
"""

from __future__ import annotations

import ast
import io
import json
import os
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import error_line
from conftest import main_in_process as _main

from deploy.sources import SourceError, load_model
from runtimes import pt2_archive
from runtimes.core import CorruptArtifact, UntrustedFile
from runtimes.pt2_archive import scan
from runtimes.safe_load import load_program

REPO = Path(__file__).resolve().parents[1]


class MakesMarker:
    """Unpickling this creates the file ``path``: code from the file, run by the loader."""

    def __init__(self, path: Path):
        self.path = os.fspath(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class Tiny(torch.nn.Module):
    """Weights (conv, BatchNorm statistics) and a tensor constant, which torch.export saves as a constant."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 1)
        self.bn = torch.nn.BatchNorm2d(3)
        self.shift = torch.tensor([0.5, -1.0, 2.0]).reshape(1, 3, 1, 1)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.shift


X = torch.ones(1, 2, 4, 4)


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict:
    """``own``: what a deploy run writes (exporters.pt2); ``plain``: ``torch.export.save`` with its example
    inputs (a pickle) and a tensor constant; ``expected``: the module's output on ``X``."""
    from exporters.pt2 import export_pt2

    folder = tmp_path_factory.mktemp("pt2")
    model = Tiny().eval()
    export_pt2(model, (X,), folder / "own.pt2", metadata={"merged": {}})
    torch.export.save(torch.export.export(model, (X,)), folder / "plain.pt2")
    return {"own": folder / "own.pt2", "plain": folder / "plain.pt2", "expected": model(X).detach()}


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None,
             drop: tuple[str, ...] = (), compression: int = zipfile.ZIP_STORED) -> Path:
    """Copy the zip archive ``src`` to ``dst``, entries named relative to its root folder: ``replace`` and
    ``drop`` some, ``add`` others (a name starting with '/' is not put under the root folder)."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": a name stored twice is a test here
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            name = info.filename[len(root) + 1:]
            if name not in drop:
                zout.writestr(info.filename, replace.get(name, zin.read(info)))
        for name, data in add.items():
            zout.writestr(name[1:] if name.startswith("/") else f"{root}/{name}", data)
    return dst


def _entry(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.split("/", 1)[1] == name))


def _pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _refused(path: Path, *names: str) -> list[str]:
    """Assert that ``path`` is refused by the allow-list, naming each of ``names``; what scan found."""
    found = scan(path)
    for name in names:
        assert any(name in f for f in found), (name, found)
    with pytest.raises(UntrustedFile, match=r"holds .*; loading it runs code from it; pass --trust-pickle"):
        load_program(path)
    return found


# ------------------------------------------------------------------------- the bypass of the deny-list

def test_a_second_program_with_a_legacy_pickled_constant_is_refused(archives, tmp_path, capsys):
    marker = tmp_path / "ran"
    own = archives["own"]
    evil = _rewrite(own, tmp_path / "evil.pt2", add={
        "models/evil_json": _entry(own, "models/model.json"),  # torch.export.load: a program named "evil"
        "data/sample_inputs/evil.pt": b"",
        "data/weights/evil_weights_config.json": _entry(own, "data/weights/model_weights_config.json"),
        "data/constants/evil.pt": _pickled({"c": MakesMarker(marker)}),  # legacy: torch.load(weights_only=False)
    })
    found = _refused(evil, "another program (models/evil_json)",
                     "pickled tensors in the legacy layout (data/constants/evil.pt)",
                     "data/sample_inputs/evil.pt", "data/weights/evil_weights_config.json")
    assert len(found) == 4, found
    assert not marker.exists()
    with pytest.raises(SourceError, match=r"holds another program \(models/evil_json\).*pass --trust-pickle"):
        load_model(str(evil))  # deploy convert evil.pt2
    assert not marker.exists()

    rc, _, err = _main(capsys, "inspect", str(evil))
    line = error_line(err)
    assert rc == 2 and "models/evil_json" in line and "data/constants/evil.pt" in line, err
    assert "pass --trust-pickle if you trust its source" in line
    assert not marker.exists()


def test_the_legacy_weights_layout_is_refused(archives, tmp_path):
    marker = tmp_path / "ran"
    legacy = _rewrite(archives["own"], tmp_path / "legacy.pt2",
                      add={"data/weights/model.pt": _pickled({"conv.weight": MakesMarker(marker)})})
    _refused(legacy, "pickled tensors in the legacy layout (data/weights/model.pt)")
    assert not marker.exists()


@pytest.mark.parametrize("name, finding", [
    ("evil/payload.bin", "an entry torch.export.save does not write"),
    ("data/notes.txt", "an entry torch.export.save does not write"),
    ("data/constants/tensor_7", "a tensor file no config names (data/constants/tensor_7)"),
    ("data/aotinductor/model/model.so", "compiled code (data/aotinductor/model/model.so)"),
    ("models/", "another program (models/)"),
])
def test_an_entry_outside_the_allow_list_is_refused_by_name(archives, tmp_path, name, finding):
    odd = _rewrite(archives["own"], tmp_path / "odd.pt2", add={name: b"\0" * 8})
    assert _refused(odd, finding, name) == [next(f for f in scan(odd) if name in f)]


def test_a_config_entry_that_is_not_a_raw_tensor_is_refused(archives, tmp_path):
    marker = tmp_path / "ran"
    own, plain = archives["own"], archives["plain"]
    # a weight saved with torch.save (use_pickle: true): torch.export.load unpickles it with weights_only=False
    config = json.loads(_entry(own, "data/weights/model_weights_config.json"))
    fqn, meta = next(iter(config["config"].items()))
    meta["use_pickle"] = True
    weight = f"data/weights/{meta['path_name']}"
    pickled = _rewrite(own, tmp_path / "pickled.pt2", replace={
        weight: _pickled(MakesMarker(marker)), "data/weights/model_weights_config.json": json.dumps(config).encode()})
    assert _refused(pickled, f"a pickled object ({weight}, for {fqn})")

    # a constant that is an opaque object (pickle.loads), and one whose file is missing
    constants = json.loads(_entry(plain, "data/constants/model_constants_config.json"))
    (fqn, meta), = constants["config"].items()
    constants["config"]["extra"] = dict(meta, path_name="opaque_obj_0", use_pickle=True, tensor_meta=None)
    opaque = _rewrite(plain, tmp_path / "opaque.pt2",
                      add={"data/constants/opaque_obj_0": _pickled(MakesMarker(marker))},
                      replace={"data/constants/model_constants_config.json": json.dumps(constants).encode()})
    assert _refused(opaque, "a pickled object (data/constants/opaque_obj_0, for extra)") == \
        ["a pickled object (data/constants/opaque_obj_0, for extra)"]
    missing = _rewrite(plain, tmp_path / "missing.pt2", drop=(f"data/constants/{meta['path_name']}",))
    _refused(missing, f"a config entry whose file is missing (data/constants/{meta['path_name']}, for {fqn})")
    assert not marker.exists()


# --------------------------------------------------------------- what lets a zip say two things, or grow

def test_a_zip_that_reads_two_ways_or_expands_is_refused(archives, tmp_path, monkeypatch):
    own = archives["own"]
    twice = _rewrite(own, tmp_path / "twice.pt2", add={"models/model.json": b"{}"})
    assert scan(twice) == ["entries stored twice (own/models/model.json)"]
    outside = _rewrite(own, tmp_path / "outside.pt2", add={"/version": b"0"})  # the pre-2.7 fallback reads it
    assert scan(outside) == ["entries outside the root folder own/ (version)"]
    packed = _rewrite(own, tmp_path / "packed.pt2", compression=zipfile.ZIP_DEFLATED)
    assert "a compressed entry (models/model.json), which torch.export.save does not write" in scan(packed)
    with pytest.raises(UntrustedFile):
        load_program(packed)
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(CorruptArtifact, match="not a zip archive"):
        load_program(tmp_path / "junk.pt2")
    no_program = _rewrite(own, tmp_path / "no_program.pt2", drop=("models/model.json",))
    with pytest.raises(CorruptArtifact, match=r"\(no models/model\.json\)"):
        load_program(no_program)

    size = zipfile.ZipFile(own).getinfo("own/models/model.json").file_size
    monkeypatch.setattr(pt2_archive, "MAX_TEXT_BYTES", 1024)  # model.json is larger: refused before it is read
    assert f"an entry too large to read (models/model.json, {size:,} bytes; at most 1,024)" in scan(own)
    monkeypatch.setattr(pt2_archive, "MAX_ENTRIES", 10)
    entries = len(zipfile.ZipFile(own).namelist())
    assert scan(own) == [f"{entries} entries (more than 10)"]


# ------------------------------------------------------------------------------ what still loads

def test_the_runs_own_archive_and_a_plain_torch_export_save_load_without_unpickling(archives, tmp_path,
                                                                                      monkeypatch):
    marker = tmp_path / "ran"
    own, plain = archives["own"], archives["plain"]
    assert scan(own) == [] and scan(plain) == []
    assert _entry(plain, "data/sample_inputs/model.pt")  # torch.export.save pickles the example inputs
    samples = _rewrite(plain, tmp_path / "samples.pt2",
                       replace={"data/sample_inputs/model.pt": _pickled(((MakesMarker(marker),), {}))})

    def no_unpickling(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr("pickle.loads", no_unpickling)
    monkeypatch.setattr("pickle.Unpickler", no_unpickling)
    extra = {"deploy.json": ""}
    program = load_program(own, extra_files=extra)
    assert torch.allclose(program.module()(X), archives["expected"], atol=1e-6)
    assert json.loads(extra["deploy.json"]) == {"merged": {}}
    for path in (plain, samples):
        program = load_program(path)
        assert program.example_inputs is None  # blanked, not unpickled
        assert torch.allclose(program.module()(X), archives["expected"], atol=1e-6)
    assert not marker.exists()


def test_trust_pickle_skips_the_allow_list(archives, tmp_path):
    """With trust_pickle the file is loaded as torch.export.load loads it: nothing is checked, and the
    example inputs are unpickled."""
    odd = _rewrite(archives["plain"], tmp_path / "odd.pt2", add={"notes/readme.txt": b"hello"})
    with pytest.raises(UntrustedFile, match=r"notes/readme\.txt"):
        load_program(odd)
    program = load_program(odd, trust_pickle=True)
    assert program.example_inputs is not None and program.module()(X).shape == (1, 3, 4, 4)


# ------------------------------------------------------------- one module calls torch's unpicklers

LOADERS = {"torch.load", "torch.export.load", "torch.serialization.load", "torch.jit.load",
           "torch.export.pt2_archive._package.load_pt2", "pickle.load", "pickle.loads", "pickle.Unpickler"}


def _loader_uses(path: Path) -> list[str]:
    """The unpickling loaders of :data:`LOADERS` that the module at ``path`` names (called or not, through
    ``import ... as`` aliases too), as ``line: name``."""
    tree = ast.parse(path.read_text(), str(path))
    alias = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
    uses = []
    for node in ast.walk(tree):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in alias:
            name = ".".join([alias[node.id], *reversed(parts)])
            if name in LOADERS:
                uses.append(f"{node.lineno}: {name}")
    return uses


def test_only_runtimes_safe_load_calls_torch_load():
    safe_load = REPO / "runtimes" / "safe_load.py"
    assert {u.split(": ")[1] for u in _loader_uses(safe_load)} >= {"torch.load", "torch.export.load"}
    offenders = {}
    for package in ("deploy", "fusers", "exporters", "runtimes"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path != safe_load and (uses := _loader_uses(path)):
                offenders[str(path.relative_to(REPO))] = uses
    assert not offenders, f"load untrusted torch files through runtimes.safe_load: {offenders}"
