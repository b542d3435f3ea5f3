"""What a user sees: one parameter count everywhere, no LiteRT INFO line on stderr, a zoo listing
that fits 100 columns, a bench chart whose sub-millisecond bars stay visible."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fusers
from deploy import sources, zoo
from deploy.inspect import count_parameters, inspect_module, layer_costs

ROOT = Path(__file__).resolve().parents[1]


def _bn_buffers(model: nn.Module) -> int:
    return sum(m.running_mean.numel() + m.running_var.numel() + m.num_batches_tracked.numel()
               for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_parameter_counts_agree_between_inspect_the_loader_and_the_captured_graph():
    loaded = sources.load_model("repvgg_a0", width=0.0625)
    model, x = loaded.model, torch.randn(1, 3, 32, 32)
    expected = sum(p.numel() for p in model.parameters())
    buffers = _bn_buffers(model)
    assert buffers > 0 and count_parameters(model) == (expected, buffers)

    record = loaded.to_dict()
    summary = inspect_module(model, (x,))
    captured = inspect_module(fusers.capture(model, (x,)), (x,))
    assert (record["params"], record["buffers"]) == (expected, buffers)
    assert (summary.params, summary.buffers) == (captured.params, captured.buffers) == (expected, buffers)
    assert f"parameters:    {expected:,} (+ {buffers:,} in buffers)" in summary.summary()
    # per op: every parameter is read by one op here, and running statistics are not parameters
    assert sum(row["params"] for row in layer_costs(model, (x,))) == expected

    plain = fusers.reparameterize(model, (x,))  # the deploy form: what the convert report counts
    deployed = inspect_module(plain, (x,))
    assert (deployed.params, deployed.buffers) == (plain.reparam_report.params_after, 0)
    assert plain.reparam_report.params_before == expected


def test_shared_unused_and_lifted_tensors_are_counted_like_module_parameters():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(8, 8)
            self.b.weight = self.a.weight  # one tensor under two names: counted once
            self.register_buffer("scale", torch.ones(4))

        def forward(self, x):
            return self.b(self.a(x)) * self.scale + torch.tensor([1.0, 2.0, 3.0, 4.0])  # a lifted constant

    model, x = Tied().eval(), torch.randn(2, 4)
    expected = (16 + 4 + 4 + 64 + 8, 4)
    assert count_parameters(model) == expected
    s = inspect_module(model, (x,))
    assert (s.params, s.buffers) == expected


_RUN_LITERT = """
import sys
import numpy as np
from runtimes.litert_runner import LiteRTRunner
x = np.load(sys.argv[2])
with LiteRTRunner(sys.argv[1]) as runner:
    out = runner.infer([x])["output0"]
np.save(sys.argv[3], out)
"""


def test_litert_runner_prints_no_xnnpack_line(tmp_path):
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    from exporters import export

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    export("tflite", module, tmp_path / "m.tflite", args=(x,))
    np.save(tmp_path / "x.npy", x.numpy())
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}  # not silenced by the environment
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _RUN_LITERT, str(tmp_path / "m.tflite"), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "XNNPACK" not in proc.stderr, proc.stderr
    with torch.no_grad():
        want = module(x).numpy()
    got = np.load(tmp_path / "y.npy")
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_zoo_listing_fits_100_columns(capsys):
    from deploy import cli

    assert cli.cmd_zoo(None) == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines and max(len(ln) for ln in lines) <= 100, max(lines, key=len)
    start = lines[0].index("description")
    described = {}  # name -> its description, continuation lines joined back
    for ln in lines[2:]:
        if ln[:start].strip():
            name = ln.split()[0]
            described[name] = [ln[start:]]
        else:
            described[name].append(ln[start:])
    assert list(described) == zoo.names()
    for name, parts in described.items():
        assert " ".join(parts) == " ".join(zoo.describe(name).split()), name


def test_bench_chart_uses_a_log_axis_and_keeps_its_text_inside(tmp_path):
    from matplotlib.text import Text

    from deploy.bench import plot

    times = {"torch": 20.0, "onnxruntime": 0.2, "openvino": 0.35}
    rows = [{"runtime": rt, "variant": "fp32", "batch": 1, "form": form, "p50": t * k, "p90": t * k * 1.2}
            for rt, t in times.items() for form, k in (("training", 1.6), ("deploy", 1.0))]
    entry = {"results": rows, "device": "cpu", "threads": 2}
    for title in ("repvgg_a0", "runs/" + "a_long_user_model_name" * 3 + ".py:build"):
        fig = plot(entry, tmp_path / "chart.png", title)
        assert (tmp_path / "chart.png").stat().st_size > 0
        (ax,) = fig.axes
        assert ax.get_yscale() == "log"
        lo, hi = ax.get_ylim()
        assert lo < 0.2 and hi > 20 * 1.6 * 1.2  # every bar and whisker in view
        fig.canvas.draw()
        renderer, frame = fig.canvas.get_renderer(), fig.bbox
        ticks = {t for t in ax.get_yticklabels() if not lo <= t.get_position()[1] <= hi}  # not drawn
        texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text() and t not in ticks]
        labels = sorted(t.get_text() for t in ax.texts)
        assert labels == ["1.60x"] * 3
        for t in texts:
            box = t.get_window_extent(renderer)
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, \
                (t.get_text(), box, frame)
        assert fig.get_tightbbox(renderer).width <= fig.get_figwidth()


def test_readme_synopsis_names_every_option_of_every_command():
    """The README's command-line synopsis lists each subcommand's own options (model options once, for convert)."""
    from pathlib import Path

    from deploy.cli import _parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    synopsis = readme[readme.index("## Command line"):readme.index("MODEL is a zoo name")]
    sub = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    convert_options = {o for a in sub.choices["convert"]._actions for o in a.option_strings}
    missing = {}
    for name, parser in sub.choices.items():
        own = {o for a in parser._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
        if name != "convert":
            own -= convert_options - {"--out", "--force"}  # model options: documented once
        absent = sorted(o for o in own if o not in synopsis and not (o in ("--verbose", "--quiet")
                                                                     and "-v|-q" in synopsis))
        if absent:
            missing[name] = absent
    assert not missing, f"options missing from the README synopsis: {missing}"
    assert "model.sim.onnx" in synopsis


def test_checking_the_targets_imports_no_runtime():
    """Start-up: refusing a missing package before any work must not import the heavy ones that are present
    (litert-torch alone takes ~5 s to import); the export imports them when it runs."""
    import subprocess
    import sys

    code = ("import sys\nfrom deploy.forms import check_targets\n"
            "order = check_targets(['onnx', 'openvino', 'tflite'], 'fp32')\n"
            "print([t.name for t in order])\n"
            "print(sorted(m for m in ('litert_torch', 'onnxsim', 'onnxscript', 'openvino', 'onnxruntime') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["['pt2', 'onnx', 'openvino', 'tflite']", "[]"]
