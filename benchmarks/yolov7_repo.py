"""The YOLOv7 repository's own yolov7-tiny: its ``fuse()`` form against our deploy form, ONNX graphs and latency.

    python benchmarks/yolov7_repo.py --repo /path/to/yolov7 [--size 320] [--runs 3] [--threads 2] [--min-ms 1000]

``--repo`` is a checkout of WongKinYiu/yolov7; its code is imported from there, nothing of it is copied here.
The network is built the way the repository builds it, ``models.yolo.Model("cfg/training/yolov7-tiny.yaml")``,
put in eval mode with randomized BatchNorm statistics (``deploy.zoo.randomize_batchnorm``; the weights are
random, latency does not depend on them), IDetect in its training form (in-place decode). Two deploy forms:

- theirs: a deep copy converted by the repository's ``Model.fuse()`` (conv-BN folding, RepConv's
  ``fuse_repvgg_block``, ``IDetect.fuse``);
- ours: ``fusers.reparameterize(model, (x,))`` with the default passes.

Both go through the same exporter, the project's (``exporters.export("onnx", ...)``: torch.export, the
dynamo exporter at opset 18, onnxsim kept only when verified), and OpenVINO IR is converted from that ONNX
file. The fuse form's ``IDetect.fuseforward`` decodes with ``split`` + ``cat`` only while
``torch.onnx.is_in_onnx_export()`` is true, which is what the repository's ``export.py`` (TorchScript
exporter) sees. torch.export never makes it true (the dynamo exporter even hard-codes it false) and cannot
trace the ``anchor_grid[i].data`` of that branch, so theirs is captured with both patched for the length of
the capture (the function true, ``.data`` read as ``.detach()``) and handed to the exporter as an
ExportedProgram. Without that, theirs would be exported with the in-place decode, ScatterND and all. (Counts
from the repository's own ``export.py`` path, the TorchScript exporter without onnxsim, are not comparable:
it leaves ``Constant`` nodes in the graph, 21 of the 187 nodes of this fuse form at opset 18.)

Printed: nodes per op type of both ONNX files with the difference, ScatterND counts, whether the two graphs
are identical node for node (then a latency ratio away from 1.00 is noise), each form's max relative
error against the original model (torch, ONNX Runtime, OpenVINO; fp32 passes at 1e-5), and latency at batch
1, fp32, ``--threads`` threads: each runtime in its own Python process (``runtimes.bench.run_isolated``: ONNX
Runtime with intra-op spinning off, OpenVINO with the LATENCY hint), ours, theirs and a second session of
their file (the noise control) interleaved call by call; ``--runs`` such sessions per runtime, alternating
runtimes. The table gives the median over the sessions of each p50, and of the per-session ratio
ours / theirs (<= 1.00: ours at least as fast), then the same numbers as rows for the README's table.

The repository's modules import cv2, pandas, seaborn, scipy, matplotlib, PIL, requests and tqdm at module
level, though building and fusing the model uses none of them. One that is not installed is replaced for the
run by a stub module (the script says which); ``pip install opencv-python-headless pandas seaborn`` avoids
that. None of them is a dependency of this project; PyYAML (to read the cfg) and torchvision are needed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.abc
import importlib.machinery
import importlib.util
import os
import statistics
import sys
import tempfile
import types
from pathlib import Path
from unittest import mock

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)  # bench processes

import torch  # noqa: E402

import fusers  # noqa: E402
from deploy import zoo  # noqa: E402
from exporters import export, targets  # noqa: E402
from exporters.onnx import op_counts  # noqa: E402
from runtimes import open_runner  # noqa: E402
from runtimes.bench import BenchJob, BenchSettings, run_isolated  # noqa: E402
from runtimes.compare import compare  # noqa: E402

CFG = "cfg/training/yolov7-tiny.yaml"
RUNTIMES = ("onnxruntime", "openvino")
TITLES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
# imported at module level by the repository's models/ and utils/, unused when building and fusing a model
STUBBABLE = ("cv2", "pandas", "seaborn", "scipy", "matplotlib", "PIL", "requests", "tqdm")


class _Stub(types.ModuleType):
    """A stand-in module: every attribute is a MagicMock; submodules are stubs too."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = mock.MagicMock(name=f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on ``sys.meta_path``: only a STUBBABLE module that no real finder found gets a stub."""

    def __init__(self):
        self.used: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top not in STUBBABLE or ("." in fullname and not isinstance(sys.modules.get(top), _Stub)):
            return None  # a real package's optional submodule stays missing
        self.used.add(top)
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _Stub(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def import_repository(repo: Path):
    """The repository's ``models.yolo`` module, with stubs for the modules it imports but does not need."""
    if not (repo / CFG).is_file() or not (repo / "models" / "yolo.py").is_file():
        raise SystemExit(f"--repo {repo} is not a yolov7 checkout: {CFG} or models/yolo.py is missing; clone "
                         "https://github.com/WongKinYiu/yolov7 and pass its folder.")
    for name in ("yaml", "torchvision"):
        if importlib.util.find_spec(name) is None:
            raise SystemExit(f"the yolov7 repository needs {name} to build its model; pip install "
                             f"{'pyyaml' if name == 'yaml' else name}.")
    finder = _StubFinder()
    sys.meta_path.append(finder)
    sys.path.insert(0, str(repo))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yolo = importlib.import_module("models.yolo")
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n, m in sys.modules.items() if isinstance(m, _Stub)]:
            del sys.modules[name]  # the repository's modules keep theirs; nobody else gets one
    if finder.used:
        print(f"stubbed for the repository's imports (not installed): {', '.join(sorted(finder.used))}",
              file=sys.stderr)
    return yolo


@contextlib.contextmanager
def onnx_export_branch():
    """``torch.onnx.is_in_onnx_export()`` true and ``t.data`` read as ``t.detach()`` (see the module docstring)."""
    with mock.patch.object(torch.onnx, "is_in_onnx_export", return_value=True), \
            mock.patch.object(torch.Tensor, "data", property(lambda t: t.detach())):
        yield


def build(yolo, repo: Path, size: int, seed: int):
    """(input, the model's outputs, theirs captured in its export branch, ours)."""
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(sys.stderr):
        model = yolo.Model(str(repo / CFG))
    model = zoo.randomize_batchnorm(model, seed).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        ref = model(x)  # also builds IDetect's grids for this size
        theirs = copy.deepcopy(model).fuse().eval()  # IDetect.fuse updates parameters in place
    with onnx_export_branch():
        theirs_program = torch.export.export(theirs, (x,), strict=False)
    ours = fusers.reparameterize(model, (x,))
    return x, ref, theirs_program, ours


def check(name: str, ref, x, torch_out, onnx_art, ov_art) -> list[str]:
    """One line per stage: the max relative error against the model and whether fp32 passes."""
    lines = []
    results = [("torch", compare(ref, torch_out))]
    for stage, art in (("onnxruntime", onnx_art), ("openvino", ov_art)):
        with open_runner(art) as runner:
            results.append((stage, compare(ref, list(runner.infer([x.numpy()]).values()))))
    for stage, result in results:
        lines.append(f"  {name:<7} {stage:<12} max rel {result.max_rel:.2e}  {'pass' if result.passed else 'FAIL'}")
    return lines


def _graph(path: str) -> list:
    """Every node's type and attributes in order, and the sorted weight shapes (to tell identical graphs)."""
    import onnx

    graph = onnx.load(path).graph
    return [[(n.op_type, [str(a) for a in n.attribute]) for n in graph.node],
            sorted(tuple(i.dims) for i in graph.initializer)]


def structure(paths: dict[str, str]) -> list[str]:
    ops = {name: op_counts(path) for name, path in paths.items()}
    names = sorted(set(ops["ours"]) | set(ops["theirs"]))
    lines = [f"  {'op':<20}{'ours':>6}{'theirs':>8}{'diff':>6}"]
    for op in names + ["total"]:
        a, b = ((sum(ops["ours"].values()), sum(ops["theirs"].values())) if op == "total"
                else (ops["ours"].get(op, 0), ops["theirs"].get(op, 0)))
        mark = "" if a == b else f"{a - b:+d}"
        lines.append(f"  {op:<20}{a:>6}{b:>8}{mark:>6}")
    lines.append(f"  ScatterND (in-place writes left in the graph): ours {ops['ours'].get('ScatterND', 0)}, "
                 f"theirs {ops['theirs'].get('ScatterND', 0)}")
    same = _graph(paths["ours"]) == _graph(paths["theirs"])
    lines.append("  the two graphs are " + ("identical node for node (op types, attributes, weight shapes)" if same
                                           else "different"))
    return lines


def time_forms(files: dict[str, dict[str, str]], args, work: Path) -> dict[str, list[dict[str, float]]]:
    """``{runtime: [{form: p50} per session]}``; sessions alternate between the runtimes."""
    settings = BenchSettings(warmup_iters=5, warmup_ms=300, min_iters=args.min_iters, min_ms=args.min_ms)
    shape = [1, 3, args.size, args.size]
    sessions: dict[str, list[dict[str, float]]] = {r: [] for r in RUNTIMES}
    for run in range(args.runs):
        for runtime in RUNTIMES if run % 2 == 0 else RUNTIMES[::-1]:
            target = targets.by_runtime(runtime)
            job = BenchJob(runtime, files[runtime], shape, runner=target.runner,
                           runner_options={**target.runner_options("fp32"), **target.bench_options},
                           note=target.bench_note, threads=args.threads, precision="fp32", settings=settings)
            print(f"timing on {TITLES[runtime]}, session {run + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            rows = run_isolated(job, str(work))["rows"]
            failed = [r for r in rows if "error" in r]
            if failed:
                raise SystemExit(f"{failed[0]['form']} failed on {runtime}: {failed[0]['error']}")
            sessions[runtime].append({r["form"]: r["p50"] for r in rows})
    return sessions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True, help="a checkout of WongKinYiu/yolov7")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--runs", type=int, default=3, help="timing sessions per runtime (each its own process)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-ms", type=float, default=1000.0, help="time per form and session, at least")
    ap.add_argument("--min-iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.size % 32 or args.runs < 1:
        ap.error("--size must be a multiple of 32 (the largest stride) and --runs at least 1")

    yolo = import_repository(args.repo.resolve())
    print("building yolov7-tiny, fusing (theirs), reparameterizing (ours) ...", file=sys.stderr, flush=True)
    x, ref, theirs_program, ours = build(yolo, args.repo.resolve(), args.size, args.seed)
    with torch.no_grad():
        outs = {"ours": ours(x), "theirs": theirs_program.module()(x)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files: dict[str, dict[str, str]] = {r: {} for r in RUNTIMES}
        checks, notes = [], []
        for name, module in (("ours", ours), ("theirs", theirs_program)):
            print(f"exporting {name} ...", file=sys.stderr, flush=True)
            onnx = export("onnx", module, work / f"{name}.onnx", args=(x,))
            ov = export("openvino", onnx, work / f"{name}.xml")
            files["onnxruntime"][name], files["openvino"][name] = onnx.path, ov.path
            checks += check(name, ref, x, outs[name], onnx, ov)
            notes.append(f"  {name}: {Path(onnx.path).name}" + ("" if onnx.parent else
                                                                 f" ({'; '.join(onnx.notes) or 'not simplified'})"))
        for runtime in RUNTIMES:  # the control: a second session of the very same file measures the noise
            files[runtime]["theirs copy"] = files[runtime]["theirs"]
        structure_lines = structure(files["onnxruntime"])
        sessions = time_forms(files, args, work)

    print(f"yolov7-tiny from {args.repo} ({CFG}), {args.size}x{args.size}, batch 1, fp32, {args.threads} threads")
    print("ONNX files (project exporter: torch.export, dynamo, opset 18, onnxsim if verified):")
    print("\n".join(notes))
    print("nodes per op type:")
    print("\n".join(structure_lines))
    print("outputs against the original model:")
    print("\n".join(checks))
    print(f"latency, p50 in ms, median of {args.runs} session(s) per runtime; ratio: median of the per-session "
          "ours/theirs (<= 1.00: ours at least as fast); noise: median |theirs copy / theirs - 1|")
    print(f"  {'runtime':<14}{'ours':>8}{'theirs':>9}{'ours/theirs':>13}{'range':>15}{'noise':>8}")
    rows = []
    for runtime in RUNTIMES:
        s = sessions[runtime]
        ours_p50 = statistics.median(r["ours"] for r in s)
        theirs_p50 = statistics.median(r["theirs"] for r in s)
        ratios = [r["ours"] / r["theirs"] for r in s]
        noise = statistics.median(abs(r["theirs copy"] / r["theirs"] - 1) for r in s)
        ratio = statistics.median(ratios)
        span = f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(f"  {runtime:<14}{ours_p50:>8.2f}{theirs_p50:>9.2f}{ratio:>13.2f}{span:>15}{noise:>8.1%}")
        rows.append(f"| YOLOv7 repository fuse() vs ours (yolov7-tiny, {args.size}×{args.size}) | {TITLES[runtime]} "
                    f"| - | {ours_p50:.2f} | {theirs_p50:.2f} | - | {ratio:.2f} | {noise:.1%} |")
    print("README rows (the timm column holds the repository's fuse() form):")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
