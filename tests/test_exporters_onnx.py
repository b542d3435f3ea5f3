import json
import os
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxsim")
pytest.importorskip("onnxscript")

from export_models import capture, example, make  # noqa: E402

import exporters  # noqa: E402
from exporters import Artifact, ExportError, MissingDependency, export  # noqa: E402
from exporters.onnx import convert_onnx_to_fp16, describe_onnx, op_counts, simplify_onnx  # noqa: E402
from runtimes import compare, flatten, open_runner  # noqa: E402


def run_onnx(path, *arrays):
    with open_runner(path) as r:
        return list(r.infer(list(arrays)).values())


@pytest.fixture(scope="module")
def convnet_onnx(tmp_path_factory):
    model, x = make("convnet"), example()
    art = export("onnx", capture(model, x), tmp_path_factory.mktemp("onnx") / "convnet.onnx", args=(x,))
    return model, x, art


def test_static_export_is_simplified_verified_and_matches_torch(convnet_onnx):
    model, x, art = convnet_onnx
    assert art.format == "onnx" and art.path.endswith("convnet.sim.onnx")
    assert art.parent.endswith("convnet.onnx") and os.path.isfile(art.parent)
    assert art.metadata["simplified"] is True and art.metadata["simplify_check"]["passed"] is True
    assert art.metadata["opset"] == 18
    assert [(s.name, s.shape, s.dtype) for s in art.inputs] == [("input0", (2, 3, 32, 32), "float32")]
    assert [(s.name, s.shape) for s in art.outputs] == [("output0", (2, 10))]
    for path in (art.parent, art.path):
        onnx.checker.check_model(path, full_check=True)
        ref = model(x).detach().numpy()
        out = run_onnx(path, x.numpy())[0]
        assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5
    # BatchNorm folded away by the exporter's optimizer, three convolutions left
    assert op_counts(art.path).get("Conv") == 3 and "BatchNormalization" not in op_counts(art.path)


def test_weights_are_embedded_in_one_file(convnet_onnx):
    model, _, art = convnet_onnx
    folder = os.path.dirname(art.path)
    assert sorted(os.listdir(folder)) == ["convnet.onnx", "convnet.sim.onnx"]
    m = onnx.load(art.path, load_external_data=False)
    assert all(init.data_location != onnx.TensorProto.EXTERNAL for init in m.graph.initializer)
    n_weights = sum(int(np.prod(i.dims)) for i in m.graph.initializer)
    assert n_weights >= sum(p.numel() for n, p in model.named_parameters() if "features" in n and p.ndim == 4)
    assert os.path.getsize(art.path) > 4 * n_weights * 0.9


def test_artifact_record_is_json_roundtrip(convnet_onnx):
    _, _, art = convnet_onnx
    d = json.loads(json.dumps(art.to_dict()))
    back = Artifact.from_dict(d)
    assert back == art
    assert d["inputs"][0] == {"name": "input0", "shape": [2, 3, 32, 32], "dtype": "float32"}


def test_plain_conv_exports_to_exactly_one_conv(tmp_path):
    model, x = make("conv"), example(1)
    art = export("onnx", capture(model, x), tmp_path / "conv.onnx", args=(x,))
    assert op_counts(art.path) == {"Conv": 1}
    out = run_onnx(art.path, x.numpy())[0]
    ref = model(x).detach().numpy()
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5


def test_nested_outputs_are_flattened_leaf_by_leaf_with_given_names(tmp_path):
    model, x = make("nested"), example()
    names = ["logits", "features", "pooled", "peak"]
    art = export("onnx", capture(model, x), tmp_path / "nested.onnx", args=(x,), input_names=["image"],
                 output_names=names)
    assert art.input_names == ["image"] and art.output_names == names
    assert [s.shape for s in art.outputs] == [(2, 5), (2, 16, 16, 16), (2, 16), (2, 16)]
    ref = flatten(model(x))
    result = compare(ref, run_onnx(art.path, x.numpy()), names=names)
    assert result.passed and len(result.outputs) == 4, result.summary()
    with pytest.raises(ExportError, match="3 output names were given"):
        export("onnx", capture(model, x), tmp_path / "bad.onnx", args=(x,), output_names=names[:3])


def test_dynamic_batch_runs_other_batch_sizes(tmp_path):
    model, x = make("convnet"), example(2)
    art = export("onnx", capture(model, x), tmp_path / "dyn.onnx", args=(x,), dynamic=True)
    assert art.inputs[0].shape == ("batch", 3, 32, 32) and art.outputs[0].shape == ("batch", 10)
    for batch in (1, 5):
        xb = example(batch, seed=batch)
        out = run_onnx(art.path, xb.numpy())[0]
        ref = model(xb).detach().numpy()
        assert out.shape == (batch, 10) and np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5


def test_dynamic_batch_refused_when_the_graph_bakes_the_batch_in(tmp_path):
    model, x = make("pow"), example(1, size=8)
    with pytest.raises(ExportError, match="constant first dimension"):
        export("onnx", capture(model, x), tmp_path / "baked.onnx", args=(x,), dynamic=True)
    assert not (tmp_path / "baked.onnx").exists()


@pytest.mark.parametrize("opset", [17, 20])
def test_opset_is_selectable(tmp_path, opset):
    model, x = make("conv"), example(1)
    art = export("onnx", capture(model, x), tmp_path / "m.onnx", args=(x,), opset=opset, simplify=False)
    assert art.metadata["opset"] == opset and art.path.endswith("m.onnx")
    assert describe_onnx(art.path).metadata["opset"] == opset


def test_opset_below_17_is_refused(tmp_path):
    with pytest.raises(ExportError, match="opset 13 is too old"):
        export("onnx", make("conv"), tmp_path / "m.onnx", args=(example(1),), opset=13)


def test_op_onnx_cannot_express_names_op_and_format(tmp_path):
    class Svd(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x)[1]

    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ExportError) as err:
        export("onnx", capture(Svd(), x), tmp_path / "svd.onnx", args=(x,))
    msg = str(err.value)
    assert "ONNX" in msg and "_linalg_svd" in msg and msg.count("\n") == 0


def test_simplifier_mismatch_keeps_unsimplified_model(convnet_onnx, tmp_path, monkeypatch):
    import onnxsim

    _, x, good = convnet_onnx
    raw = describe_onnx(good.parent)
    real = onnxsim.simplify

    def perturbing_simplify(model, *a, **k):  # a simplifier that changes the numbers
        model, ok = real(model, *a, **k)
        init = next(i for i in model.graph.initializer if len(i.dims) == 4)
        w = onnx.numpy_helper.to_array(init) * 1.01
        init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
        return model, ok

    monkeypatch.setattr(onnxsim, "simplify", perturbing_simplify)
    art, accepted = simplify_onnx(raw, tmp_path / "bad.sim.onnx")
    assert accepted is False and art.path == raw.path and art.metadata["simplified"] is False
    assert any("onnxsim changed the numbers" in n for n in art.notes)


def test_fp16_conversion_keeps_fp32_io_and_agrees(convnet_onnx, tmp_path):
    model, x, art = convnet_onnx
    half = convert_onnx_to_fp16(art, tmp_path / "half.onnx")
    m = onnx.load(half.path)
    assert half.precision == "fp16" and half.parent == art.path
    assert half.inputs[0].dtype == "float32" and half.outputs[0].dtype == "float32"
    float_inits = [i for i in m.graph.initializer if i.data_type in (1, 10)]
    assert float_inits and all(i.data_type == 10 for i in float_inits)
    ref = model(x).detach().numpy()
    out = run_onnx(half.path, x.numpy())[0]
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert 0 < err <= 1e-2


def test_missing_onnx_packages_name_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxsim", None)
    art = export("onnx", make("conv"), tmp_path / "m.onnx", args=(example(1),), simplify=False)
    with pytest.raises(MissingDependency, match=r"pip install 'reparam-deploy\[onnx\]'"):
        simplify_onnx(art)


def test_registry_rejects_unknown_format_and_missing_args(tmp_path):
    with pytest.raises(ValueError, match="known formats: onnx, openvino, tflite, tensorrt"):
        exporters.exporter("caffe")
    with pytest.raises(ExportError, match="needs example inputs"):
        export("onnx", make("conv"), tmp_path / "m.onnx")


class ChannelsLastPool(torch.nn.Module):
    """ConvNeXt's block and head as timm writes them: ``permute`` to NHWC for LayerNorm and the MLP's Linear,
    ``permute`` back (a tensor strided channels-last), then a global average pool and the classifier."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, c, 3, padding=1)
        self.norm = torch.nn.LayerNorm(c)
        self.fc1 = torch.nn.Linear(c, c)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.head = torch.nn.Linear(c, 4)

    def forward(self, x):
        x = self.conv(x)
        x = self.fc1(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2) + x  # the block's output first
        return self.head(self.pool(x).flatten(1))


def test_a_global_pool_of_a_channels_last_tensor_exports_as_one_reduce_mean(tmp_path):
    """torch's decomposition of the pool would restore its channels-last strides with ``as_strided`` (ONNX
    ``Gather``, which ncnn cannot express); the export writes the mean the pool is."""
    from exporters.onnx import export_onnx_raw

    model, x = ChannelsLastPool().eval(), torch.randn(2, 3, 6, 6)
    gm = capture(model, x)
    art = export_onnx_raw(gm, (x,), tmp_path / "model.onnx")
    ops = op_counts(art.path)
    assert "Gather" not in ops and ops["ReduceMean"] == 1
    assert "adaptive_avg_pool2d" in str(gm.graph)  # the graph handed in is left as it was
    (got,) = run_onnx(art.path, x.numpy())
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
