"""ExecuTorch: the target record, the runner's refusals, INT8 through XNNPACK's quantizer, and the default
model through ``model.pte`` and ``model.int8.pte``.

The record is read from the registry (no package needed). With ``executorch`` installed the shipped
RepVGG-Digits converts to a ``.pte`` lowered to XNNPACK, and the stage is verified against the training
model on the seeded inputs and the 360 held-out digits like every other stage; its INT8 form is judged by
the accuracy guard.
"""

from __future__ import annotations

import pytest

from exporters import targets
from runtimes.core import CorruptArtifact, MissingDependency


def test_target_record_is_registered_and_not_in_the_default_targets():
    t = targets.get("executorch")
    assert (t.runtime, t.suffixes, t.source, t.precisions) == ("executorch", (".pte",), "torch", ("fp32", "int8"))
    assert not t.default and ("executorch", "executorch") in t.requires
    assert targets.by_suffix(".pte") is t


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "executorch", None)  # an import known to fail
    with pytest.raises(MissingDependency, match=r"'executorch' .*pip install 'reparam-deploy\[executorch\]'"):
        targets.check_available(targets.get("executorch"))


def test_corrupt_or_empty_pte_is_one_sentence_naming_the_file(tmp_path):
    pytest.importorskip("executorch.runtime", reason="executorch not installed")
    from runtimes.executorch_runner import ExecuTorchRunner

    bad = tmp_path / "model.pte"
    bad.write_bytes(b"not a flatbuffer at all" * 10)
    with pytest.raises(CorruptArtifact, match=rf"ExecuTorch file {bad} is corrupt"):
        ExecuTorchRunner(bad).activate()
    empty = tmp_path / "empty.pte"
    empty.write_bytes(b"")
    with pytest.raises(CorruptArtifact, match="it is empty"):
        ExecuTorchRunner(empty).activate()
    from deploy.inspect import inspect_path

    with pytest.raises(CorruptArtifact, match=rf"cannot read {bad} as executorch"):
        inspect_path(bad)


def _small_net():
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    return net, (torch.randn(1, 3, 8, 8),)


def test_int8_quantizes_every_conv_of_a_plain_graph_that_shares_equal_biases():
    """Squeeze-excitation written as timm writes it (RegNetY's ``se.fc1``/``se.fc2``, zero-initialized biases),
    twice: the plain graph reads the equal biases once, and XNNPACK's quantizer skipped every conv whose bias another
    conv had annotated, leaving it in float between int8 neighbours, a program XNNPACK refused to load."""
    pytest.importorskip("executorch", reason="executorch not installed")
    import numpy as np
    import torch
    from torch import nn

    import fusers
    from exporters._torch import recaptured
    from exporters.executorch_int8 import _batches, _quantizer, int8_ops
    from exporters.int8 import Int8Options
    from exporters.pt2e import adjust_weights, calibrate
    from fusers.graph import fetch_attr

    class SqueezeExcite(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
            for fc in (self.fc1, self.fc2):
                nn.init.zeros_(fc.bias)

        def forward(self, x):
            return x * self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SqueezeExcite(8), nn.Conv2d(8, 8, 3, padding=1),
                        SqueezeExcite(8)).eval()
    args = (torch.randn(1, 3, 8, 8),)
    plain = fusers.reparameterize(net, args)
    gm = recaptured(plain, args)
    shared = [n for n in gm.graph.nodes if n.op == "get_attr" and len(n.users) > 1]
    assert shared  # the two fc1 biases (and the two fc2 biases) are one tensor each in the plain graph
    first = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.conv2d.default
                 and n.args[2] is not None and len(n.args[2].users) > 1)
    second = next(u for u in first.args[2].users if u is not first)  # the conv reading the same bias

    def bias(conv):
        return fetch_attr(gm, conv.args[2].target)

    # as the exporters do: the layers' own weights first (a bias correction of one conv only), then calibration
    options = Int8Options(torch.randn(8, 3, 8, 8).numpy(),
                          bias_correction={first.name: np.ones(bias(first).shape[0], np.float32)})
    assert adjust_weights(gm, options)["bias_corrected"] == 1
    assert float(bias(first).sum()) != 0 and float(bias(second).abs().sum()) == 0  # the other's bias unchanged
    converted, _ = calibrate(gm, _quantizer(options, []), _batches(options, args[0]), fold_quantize=True)
    ops = int8_ops(converted)
    assert ops["int8"]["conv2d"] == 6 and "conv2d" not in ops["float"]


@pytest.mark.e2e
def test_int8_program_computes_in_int8_and_keeps_excluded_layers_in_float(tmp_path):
    pytest.importorskip("executorch.runtime", reason="executorch not installed")
    import numpy as np
    import torch

    from exporters.executorch import export_executorch
    from exporters.executorch_int8 import quantize_executorch
    from exporters.int8 import Int8Options
    from runtimes.executorch_runner import ExecuTorchRunner

    net, args = _small_net()
    fp32 = export_executorch(net, args, tmp_path / "model.pte")
    calibration = np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)
    q = quantize_executorch(fp32, tmp_path / "model.int8.pte", Int8Options(calibration), module=net, args=args)
    ops = q.metadata["int8"]["ops"]
    assert (ops["int8"]["conv2d"], ops["int8"]["linear"], ops["float"]) == (2, 1, {})
    assert q.precision == "int8" and q.metadata["portable_ops"] == {}
    x = calibration[:1]
    with ExecuTorchRunner(tmp_path / "model.int8.pte") as r:
        got = next(iter(r.infer([x]).values()))
    want = net(torch.from_numpy(x)).detach().numpy()
    assert 0 < np.abs(got - want).max() <= 0.05 * np.abs(want).max()  # int8 rounding: close, not exact

    from deploy.inspect import inspect_path

    for summary in (inspect_path(tmp_path / "model.pte"), inspect_path(tmp_path / "model.int8.pte")):
        assert (summary.convolutions, summary.linears, summary.conv_kernels) == (2, 1, {"3x3": 2})
        assert summary.params == sum(p.numel() for p in net.parameters()) == 844
        assert summary.macs == 8 * 8 * 8 * (3 * 9 + 8 * 9) + 4 * 8
    assert summary.ops["Convert"] == 2  # the int8 program quantizes its input and dequantizes its output

    kept = quantize_executorch(fp32, tmp_path / "kept.pte", Int8Options(calibration, exclude=("conv2d",)),
                               module=net, args=args)
    assert kept.metadata["int8"]["ops"]["float"]["conv2d"] == 1
    assert kept.metadata["int8"]["ops"]["int8"]["conv2d"] == 1
    with pytest.raises(ValueError, match="cannot keep conv9 in float: the plain graph has no such node"):
        quantize_executorch(fp32, tmp_path / "bad.pte", Int8Options(calibration, exclude=("conv9",)),
                            module=net, args=args)


@pytest.mark.e2e
def test_default_model_converts_and_verifies_on_executorch(tmp_path):
    pytest.importorskip("executorch.runtime", reason="executorch not installed")
    from deploy.pipeline import ConvertOptions, convert

    result = convert(ConvertOptions(model="repvgg_digits", targets=("executorch",), precision="int8",
                                    out=str(tmp_path / "run")))
    assert result.passed
    stages = {s.name: s for s in result.stages}
    art, v = stages["executorch"].export.artifact, stages["executorch"].verification
    assert art.path.endswith("model.pte") and art.metadata["delegated_calls"] >= 1
    assert "XnnpackBackend" in art.metadata["backends"]
    assert v.max_rel <= 1e-4 and v.samples_max_rel <= 1e-4 and v.accuracy == 1.0
    q, qv = stages["executorch-int8"].export.artifact, stages["executorch-int8"].verification
    assert q.path.endswith("model.int8.pte") and q.precision == "int8"
    assert q.metadata["int8"]["ops"]["int8"]["conv2d"] == 6 and not q.metadata["int8"]["ops"]["float"]
    assert stages["executorch-int8"].files.size < 0.4 * stages["executorch"].files.size  # int8 weights stored
    assert qv.passed and qv.accuracy >= v.accuracy - 0.01
