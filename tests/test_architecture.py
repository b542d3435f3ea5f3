"""The shape of the code: package layering read from the imports, and a target added by a registry entry alone.

The layering is ``runtimes`` (vocabulary and runners) below ``exporters`` (formats, the target
registry) below ``deploy``; ``fusers`` (the compiler core) may use the vocabulary but nothing above
it. A cycle between ``exporters`` and ``runtimes`` would make each format's runner and exporter
depend on each other again.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("deploy", "exporters", "fusers", "runtimes")
ALLOWED = {"runtimes": set(), "fusers": {"runtimes"}, "exporters": {"runtimes", "fusers"},
           "deploy": {"runtimes", "fusers", "exporters"}}


def _imports(package: str) -> dict[str, set[str]]:
    """``{file: packages of this project it imports}``, every import statement counted (also inside functions)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            found |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES}
        out[str(path.relative_to(ROOT))] = found - {package}
    return out


def _modules(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the project's packages (a package is its __init__)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _module_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """The project's modules and the modules each imports (every import statement, also inside functions and
    under TYPE_CHECKING), and the private names (``_x``) one module takes from another: imported by name, or
    read as an attribute of an imported module (``forms._attempt``)."""
    modules = _modules(root)

    def owner(name: str) -> str | None:  # the module a dotted name lies in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph, private = {m: set() for m in modules}, []
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        bound = {}  # local name -> project module
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if (target := owner(a.name)) is not None:
                        graph[mod].add(target)
                        bound[a.asname or a.name] = target if a.asname else owner(a.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                if owner(base) is None:
                    continue
                for a in node.names:
                    full = f"{base}.{a.name}"
                    target = full if full in modules else owner(base)
                    graph[mod].add(target)
                    if full in modules:
                        bound[a.asname or a.name] = full
                    elif a.name.startswith("_") and not a.name.startswith("__"):
                        private.append((mod, target, a.name))
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                  and node.attr.startswith("_") and not node.attr.startswith("__")):
                private.append((mod, bound[node.value.id], node.attr))
        graph[mod].discard(mod)
    return graph, [(m, t, n) for m, t, n in private if t != m]


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iteratively)."""
    index, low, on, stack, groups = {}, {}, set(), [], []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
    return groups


def test_no_module_imports_itself_through_others():
    circles = _circles(_module_graph()[0])
    assert not circles, f"import circles: {circles}"


def test_no_module_takes_another_modules_private_names():
    taken = _module_graph()[1]
    assert not taken, "private names used across modules: " + ", ".join(f"{m} uses {t}.{n}" for m, t, n in taken)


def test_the_circle_finder_sees_a_circle_and_a_private_name(tmp_path):
    """The reader is not blind: a function-level import closing a circle, and ``module._private``, are found."""
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "__init__.py").write_text("")
    (tmp_path / "deploy" / "a.py").write_text("from .b import helper\n")
    (tmp_path / "deploy" / "b.py").write_text("def helper():\n    from . import c\n    return c._secret\n")
    (tmp_path / "deploy" / "c.py").write_text("from deploy.a import helper\n_secret = 1\n")
    graph, private = _module_graph(tmp_path)
    assert _circles(graph) == [["deploy.a", "deploy.b", "deploy.c"]]
    assert private == [("deploy.b", "deploy.c", "_secret")]


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_the_layers_below_them(package):
    wrong = {f: sorted(deps - ALLOWED[package]) for f, deps in _imports(package).items() if deps - ALLOWED[package]}
    assert not wrong, f"{package} imports packages above it: {wrong}"


def test_exporters_and_runtimes_do_not_import_each_other_both_ways():
    uses = {p: set().union(*_imports(p).values()) for p in ("exporters", "runtimes")}
    assert "runtimes" in uses["exporters"] and "exporters" not in uses["runtimes"]


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The import reader is not blind: a function-level import of exporters inside runtimes is found."""
    fake = tmp_path / "runtimes"
    fake.mkdir()
    (fake / "x.py").write_text("def f():\n    from exporters.onnx import export_onnx\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert _imports("runtimes") == {"runtimes/x.py": {"exporters"}}


# ----------------------------------------------------------------------------------- a new target

def _basic_onnx_target():
    """A second ONNX flavour declared the way a new format module would: the raw dynamo export (no onnxsim),
    run on ONNX Runtime with basic graph optimizations only."""
    from exporters.onnx import export_onnx
    from exporters.targets import Product, Target

    def export(job):
        art = export_onnx(job.module, job.args, job.folder / "model.basic.onnx", dynamic=job.dynamic,
                          opset=job.opset, simplify=False)
        art.format = "onnx-basic"
        return [Product("onnx-basic", art)]

    return Target(name="onnx-basic", runtime="onnxruntime-basic", suffixes=(".basic.onnx",), source="torch",
                  export=export, runner="runtimes.onnxruntime_runner:OnnxRuntimeRunner",
                  requires=(("onnx", "onnx"), ("onnxruntime", "onnx")), inspect="deploy.inspect:read_onnx",
                  precisions=("fp32",), bench_options={"optimization": "basic"},
                  bench_note={"graph_optimization": "basic"})


@pytest.fixture
def basic_onnx():
    pytest.importorskip("onnxruntime")
    from exporters import targets

    target = targets.register(_basic_onnx_target())
    yield target
    targets.unregister(target.name)


@pytest.mark.e2e
def test_a_registered_target_is_converted_verified_inspected_and_benched(basic_onnx, tmp_path, capsys):
    from deploy.bench import BenchOptions, bench
    from deploy.cli import main
    from deploy.inspect import inspect_path
    from deploy.pipeline import verify
    from runtimes.bench import BenchSettings

    out = tmp_path / "run"
    rc = main(["convert", "repvgg_digits", "--targets", "onnx-basic", "--out", str(out), "-q"])
    assert rc == 0, capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["training", "pt2", "onnx-basic"]
    stage = report["stages"][2]
    assert stage["files"]["files"] == ["model.basic.onnx"] and stage["export"]["parent"] == "pt2"
    assert stage["verification"]["passed"] and stage["verification"]["max_rel"] <= 1e-5
    assert stage["verification"]["agreement"] == 1.0  # the shipped held-out digits, every prediction equal

    assert verify(out).passed
    summary = inspect_path(out / "model.basic.onnx")
    assert summary.format == "onnx-basic, opset 18" and summary.convolutions == 6 and summary.batchnorms == 0
    assert summary.merged["branch_groups_merged"] == 6  # read back from the run's record

    settings = BenchSettings(warmup_iters=1, warmup_ms=0, min_iters=5, min_ms=0)
    result = bench(BenchOptions(str(out), runtimes=["onnxruntime-basic"], threads=1, settings=settings,
                                isolation="none", chart=False))
    rows = result.entry["results"]
    assert {(r["runtime"], r["form"]) for r in rows} == {("onnxruntime-basic", "deploy")} and rows[0]["p50"] > 0
    assert result.entry["settings"]["runtime_settings"]["onnxruntime-basic"]["graph_optimization"] == "basic"


def test_unknown_targets_list_the_registered_ones(basic_onnx, tmp_path):
    from deploy.pipeline import ConvertOptions, PipelineError, convert

    with pytest.raises(PipelineError, match=r"known targets: onnx, openvino, tflite, tensorrt, executorch, ncnn, mnn, "
                                            r"coreml, onnx-basic"):
        convert(ConvertOptions(targets=("caffe",), out=str(tmp_path / "o")))


def test_runner_suffix_table_comes_from_the_runner_classes():
    from runtimes import RUNNERS, RUNNERS_BY_SUFFIX, OpenVINORunner

    assert RUNNERS_BY_SUFFIX[".xml"] is OpenVINORunner
    assert set(RUNNERS_BY_SUFFIX) == {s for cls in RUNNERS for s in cls.suffixes}


def test_every_builtin_target_declares_a_runner_and_a_unique_runtime():
    from exporters import targets

    built = targets.all_targets()
    assert [t.name for t in built][:5] == ["pt2", "onnx", "openvino", "tflite", "tensorrt"]
    assert len({t.runtime for t in built}) == len(built)
    for t in built:
        assert t.runner_class().suffixes and set(t.suffixes) <= set(t.runner_class().suffixes)
    assert targets.by_suffix("a/model.sim.onnx").name == "onnx" and targets.by_suffix("x.caffemodel") is None
    assert [t.name for t in targets.export_order(["openvino"])] == ["pt2", "onnx", "openvino"]


def test_error_measure_is_one_function_for_numpy_and_torch():
    from fusers.numerics import max_rel_error as fusers_measure
    from runtimes.compare import compare
    from runtimes.core import max_rel_error

    a = np.random.default_rng(0).standard_normal((4, 5))
    b = a + 1e-3
    assert fusers_measure is max_rel_error or fusers_measure(torch.from_numpy(a), torch.from_numpy(b)) == \
        pytest.approx(max_rel_error(a, b))
    assert max_rel_error(torch.from_numpy(a), b) == pytest.approx(compare(a, b).max_rel)
    assert max_rel_error((a, {"x": a}), (a, {"x": b})) == pytest.approx(1e-3 / np.abs(a).max())
    assert max_rel_error(a, a[:2]) == float("inf") and max_rel_error(a, a * np.nan) == float("inf")


def test_phone_runtimes_are_declared_and_their_timings_here_carry_the_caveat():
    import platform

    from exporters import targets

    assert [t.runtime for t in targets.all_targets() if t.mobile] == ["tflite", "executorch", "ncnn", "mnn", "coreml"]
    assert targets.phone_note(["onnxruntime", "openvino"]) == ""
    assert targets.phone_note(["onnxruntime", "ncnn", "mnn", "ncnn"]) == (
        f"ncnn, mnn: phone runtimes timed on this machine's {platform.machine()} CPU, not on a phone: no claim about "
        "their speed on a phone's ARM CPU")
    assert targets.phone_note(["executorch"]).endswith("no claim about its speed on a phone's ARM CPU")
