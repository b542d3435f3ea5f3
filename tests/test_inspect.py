"""Op summaries: the same numbers from a model, a .pt2, ONNX, OpenVINO IR and TFLite, checked independently."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from torch import nn

import fusers
from deploy import cli, zoo
from deploy.inspect import inspect_module, inspect_path, inspect_source
from exporters import export

pytest.importorskip("onnxruntime")


def hooked_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, int, int]:
    """(MACs, convolutions, linears) counted by forward hooks on the eager modules: an independent count."""
    total, counts = [0], [0, 0]

    def hook(module, inputs, output):
        total[0] += output.numel() * module.weight[0].numel()
        counts[isinstance(module, nn.Linear)] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0], counts[0], counts[1]


def test_training_form_of_the_default_model():
    model = zoo.create("repvgg_digits", pretrained=True)
    x = torch.zeros(1, 1, 8, 8)
    summary = inspect_module(model, (x,), "digits")
    macs, convs, linears = hooked_macs(model, x)
    assert (summary.macs, summary.convolutions, summary.linears) == (macs, convs, linears) == (666_240, 12, 1)
    assert summary.flops == 2 * macs and summary.conv_kernels == {"3x3": 6, "1x1": 6}
    assert (summary.branch_groups, summary.branches, summary.batchnorms) == (6, 15, 15)
    bn_buffers = sum(m.running_mean.numel() + m.running_var.numel() + m.num_batches_tracked.numel()
                     for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert (summary.params, summary.buffers) == (sum(p.numel() for p in model.parameters()), bn_buffers)
    assert summary.ops["conv2d"] == 12 and summary.ops["batch_norm"] == 15 and summary.ops["add"] == 9
    assert summary.inputs == ["x 1x1x8x8 float32"] and summary.outputs == ["output0 1x10 float32"]
    text = summary.summary()
    assert "mergeable:     6 branch group(s) (15 branches), 15 BatchNorm(s) to fold" in text
    assert "MACs:          666.240 K" in text


@pytest.mark.parametrize("name", ["acnet_resnet", "dbb_resnet", "mobileone_s0", "repvgg_b1g2"])
def test_mergeable_groups_match_the_blocks_and_vanish_after_the_passes(name):
    block_types = {"acnet_resnet": "ACBlock", "dbb_resnet": "DiverseBranchBlock", "mobileone_s0": "MobileOneBlock",
                   "repvgg_b1g2": "RepVGGBlock"}
    depths = {"acnet_resnet": (1, 1, 1), "dbb_resnet": (1, 1, 1), "mobileone_s0": (1, 1, 1, 1),
              "repvgg_b1g2": (1, 2, 2, 1, 1)}[name]  # small, but with every kind of block and groups=2
    model = zoo.randomize_batchnorm(zoo.create(name, width=0.25, depths=depths), seed=1).eval()
    x = torch.randn(1, 3, 32, 32)
    blocks = sum(type(m).__name__ == block_types[name] for m in model.modules())
    before = inspect_module(model, (x,))
    assert before.branch_groups == blocks > 0 and before.branches >= 2 * blocks
    plain = fusers.reparameterize(model, (x,))
    after = inspect_module(plain, (x,))
    assert (after.branch_groups, after.batchnorms) == (0, 0)
    assert after.macs == hooked_macs_plain(plain, x) < before.macs
    if name == "repvgg_b1g2":
        assert any(k.endswith("g2") for k in after.conv_kernels)


def hooked_macs_plain(gm, x) -> int:
    """MACs of a plain GraphModule from its convolution / linear weights and output shapes (shape propagation)."""
    from torch.fx.passes.shape_prop import ShapeProp

    from fusers.graph import fetch_attr

    ShapeProp(gm).propagate(x)
    total = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] in ("conv2d", "linear"):
            weight = fetch_attr(gm, node.args[1].target)
            total += node.meta["tensor_meta"].shape.numel() * weight[0].numel()
    return total


def test_residual_through_a_nonlinearity_is_not_mergeable():
    class Basic(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + x)

    summary = inspect_module(Basic().eval(), (torch.randn(1, 4, 8, 8),))
    assert (summary.branch_groups, summary.branches, summary.batchnorms) == (0, 0, 2)


@pytest.mark.e2e
def test_every_artifact_of_the_default_run_reports_the_same_numbers(digits_run):
    proc, out = digits_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    plain_params = report["reparameterize"]["params_after"]
    program = torch.export.load(out / "model.deploy.pt2").module()
    expected_macs = hooked_macs_plain(program, torch.zeros(1, 1, 8, 8))
    assert expected_macs == report["reparameterize"]["merged"]["macs_after"] == 599_680
    for name, fmt in [("model.deploy.pt2", "pt2"), ("model.onnx", "onnx, opset 18"),
                      ("model.sim.onnx", "onnx, opset 18"), ("model.xml", "openvino"), ("model.tflite", "tflite")]:
        s = inspect_path(out / name)
        assert s.format == fmt, name
        assert (s.params, s.macs, s.convolutions, s.linears) == (plain_params, expected_macs, 6, 1), name
        assert (s.branch_groups, s.batchnorms) == (0, 0), name
        assert (s.merged["branch_groups_merged"], s.merged["branches_merged"], s.merged["batchnorms_folded"]) == \
            (6, 15, 15), name
        assert len(s.inputs) == 1 and "1x1x8x8" in s.inputs[0] and "1x10" in s.outputs[0], name
    assert inspect_path(out / "model.sim.onnx").ops == {"Conv": 6, "Relu": 6, "ReduceMean": 1, "Reshape": 1,
                                                        "Gemm": 1}
    assert "model.deploy.pt2 metadata" in inspect_path(out / "model.deploy.pt2").merged["from"]


@pytest.mark.e2e
def test_fp16_artifacts_count_their_weights_once(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("litert_torch")
    model = zoo.randomize_batchnorm(zoo.create("repvgg_a0", width=0.125, num_classes=10,
                                               depths=(1, 1, 1, 1, 1)), seed=0).eval()
    x = torch.randn(1, 3, 32, 32)
    plain = fusers.reparameterize(model, (x,))
    params = sum(p.numel() for p in plain.parameters())
    macs = hooked_macs_plain(plain, x)
    onnx_art = export("onnx", plain, tmp_path / "m.onnx", args=(x,))
    for art in (export("openvino", onnx_art, tmp_path / "m16.xml", precision="fp16"),
                export("tflite", plain, tmp_path / "m16.tflite", args=(x,), precision="fp16")):
        s = inspect_path(art.path)
        assert (s.params, s.macs, s.convolutions, s.branch_groups) == (params, macs, 5, 0), art.path
        assert s.merged is None  # not written by a deploy run


def test_cli_inspect(capsys, tmp_path):
    filters, root = warnings.filters[:], logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert cli.main(["inspect", "repvgg_digits", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert (data["branch_groups"], data["branches"], data["macs"], data["flops"]) == (6, 15, 666_240, 1_332_480)
        assert cli.main(["inspect", "repvgg_a0", "--width", "0.25", "--input-shape", "1,3,32,32"]) == 0
        text = capsys.readouterr().out
        assert "mergeable:     22 branch group(s) (61 branches)" in text and "input 1x3x32x32" in text
        (tmp_path / "model.bin").write_bytes(b"")
        assert cli.main(["inspect", str(tmp_path / "model.bin")]) == 2
        assert "error:" in capsys.readouterr().err
        assert cli.main(["inspect", str(tmp_path / "absent.onnx")]) == 2
        assert "does not exist" in capsys.readouterr().err
        (tmp_path / "bad.onnx").write_bytes(b"garbage")
        assert cli.main(["inspect", str(tmp_path / "bad.onnx")]) == 2
        assert "cannot read" in capsys.readouterr().err
    finally:
        warnings.filters[:] = filters
        root.handlers[:], root.level = handlers, level
        logging.captureWarnings(False)


def test_inspect_source_needs_a_shape_for_user_code(tmp_path):
    (tmp_path / "f.py").write_text("from torch import nn\n\n\ndef f():\n    return nn.Conv2d(1, 2, 3).eval()\n")
    with pytest.raises(ValueError, match="pass --input-shape"):
        inspect_source(f"{tmp_path / 'f.py'}:f")
    s = inspect_source(f"{tmp_path / 'f.py'}:f", (2, 1, 5, 5))
    assert (s.macs, s.params, s.conv_kernels) == (2 * 2 * 3 * 3 * 9, 2 * 9 + 2, {"3x3": 1})


def test_guideline_metrics_are_counted_exactly():
    """ShuffleNet V2's guidelines: memory access (bytes read + written), element-wise ops, fragmentation."""
    import torch
    from torch import nn

    from deploy.inspect import inspect_module

    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 2, 1, bias=False), nn.Conv2d(1, 2, 1, bias=False)

        def forward(self, x):
            return torch.relu(self.a(x) + self.b(x))

    s = inspect_module(Fork(), (torch.randn(1, 1, 2, 2),))
    # conv: x 16 B + weight 8 B + out 32 B (x2); add: 32 + 32 + 32 B; relu: 32 + 32 B
    assert s.memory_access == 2 * (16 + 8 + 32) + 96 + 64
    assert s.elementwise == 2 and (s.forks, s.fork_branches) == (1, 2)
    assert "guidelines:" in s.summary() and "2 parallel paths" in s.summary()


def test_guideline_metrics_for_shufflenet_v2_and_ghostnet():
    import torch

    from deploy import zoo
    from deploy.inspect import inspect_module

    for name in ("shufflenet_v2", "ghostnet"):
        model = zoo.create(name, width=0.5).eval()
        s = inspect_module(model, (torch.randn(1, 3, 32, 32),))
        relus = s.ops.get("relu", 0) + s.ops.get("relu_", 0)
        assert s.elementwise >= relus > 0 and s.memory_access > 0 and s.forks >= 1
