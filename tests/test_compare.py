import json
import math

import numpy as np
import pytest
import torch

from exporters import TensorSpec
from runtimes import Stage, Tolerance, compare, flatten, load_inputs, make_inputs, save_inputs, verify_chain


def test_metrics_relative_to_output_scale():
    a = np.array([[10.0, -2.0, 0.001], [4.0, 5.0, 6.0]], np.float32)
    b = a.copy()
    b[0, 2] += 0.01  # tiny value, large element-wise relative error: irrelevant at the output's scale
    r = compare(a, b)
    o = r.outputs[0]
    assert o.max_abs == pytest.approx(0.01, rel=1e-4) and o.max_rel == pytest.approx(0.001, rel=1e-4)
    assert 0.999999 < o.cosine <= 1.0 and o.top1 == 1.0
    assert not r.passed and "exceeds rtol 1e-05" in o.reason
    assert compare(a, b, precision="fp16").passed


def test_top1_agreement_for_classifier_outputs():
    a = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 5.0, 1.0], [1.0, 0.0, 0.0]])
    b = a.copy()
    b[1] = [1.0, 2.0, 3.0]
    o = compare(a, b, 1.0).outputs[0]
    assert o.top1 == 0.75 and compare(a[:, :1], b[:, :1]).outputs[0].top1 is None


def test_tolerances_by_precision_and_per_output_override():
    ref = [np.ones(4), np.ones(4)]
    out = [np.ones(4) * (1 + 5e-3), np.ones(4) * (1 + 5e-3)]
    assert not compare(ref, out).passed
    assert compare(ref, out, precision="fp16").passed
    r = compare(ref, out, {"output1": 1e-2})
    assert [o.passed for o in r.outputs] == [False, True] and r.failed_outputs == ["output0"]
    r = compare(ref, out, Tolerance(rtol=1e-5, per_output={0: 1e-2}))
    assert [o.passed for o in r.outputs] == [True, False]
    assert Tolerance.for_precision("fp16").rtol == 1e-2 and Tolerance.for_precision("fp32").rtol == 1e-5


def test_shape_count_nan_and_integer_mismatches_fail():
    assert "shape (3,) differs" in compare([np.ones(2)], [np.ones(3)]).outputs[0].reason
    assert "1 outputs where the reference has 2" in compare([np.ones(2), np.ones(2)], [np.ones(2)]).summary()
    nan = np.array([1.0, np.nan])
    assert "NaN" in compare(np.ones(2), nan).outputs[0].reason
    # NaN in the reference proves nothing (issue 12): it fails, unless compared with a parent stage
    assert not compare(nan, nan.copy()).passed and "reference holds 1 NaN" in compare(nan, nan).outputs[0].reason
    assert compare(nan, nan.copy(), match_nonfinite=True).passed
    assert not compare(np.array([1, 2]), np.array([1, 3])).passed and compare(np.arange(3), np.arange(3)).passed
    assert compare(np.zeros(3), np.zeros(3)).passed and compare(np.zeros(3), np.zeros(3)).outputs[0].max_rel == 0


def test_nested_outputs_flatten_leaf_by_leaf():
    t = torch.arange(3.0)
    nested = (t, [t * 2, {"b": t * 3, "a": t * 4}], np.array([5.0]))
    leaves = flatten(nested)
    assert [x.tolist() for x in leaves] == [[0, 1, 2], [0, 2, 4], [0, 3, 6], [0, 4, 8], [5.0]]
    r = compare(nested, leaves)
    assert r.passed and [o.name for o in r.outputs] == [f"output{i}" for i in range(5)]
    named = {f"y{i}": leaf for i, leaf in enumerate(leaves)}  # a runner's {name: array} output
    assert compare(nested, named).passed and [o.name for o in compare(nested, named).outputs][0] == "output0"


def test_result_to_dict_is_json():
    r = compare([np.ones(3)], [np.array([1.0, 2.0, np.inf])])
    d = json.loads(json.dumps(r.to_dict()))
    assert d["passed"] is False and d["outputs"][0]["name"] == "output0"


def test_make_inputs_is_seeded_and_typed():
    specs = [TensorSpec("x", ("batch", 3, 4, 4), "float32"), TensorSpec("ids", (2, 5), "int64"),
             TensorSpec("mask", (2,), "bool")]
    a, b, c = make_inputs(specs, seed=7), make_inputs(specs, seed=7), make_inputs(specs, seed=8)
    assert a["x"].shape == (1, 3, 4, 4) and a["x"].dtype == np.float32
    assert a["ids"].dtype == np.int64 and a["ids"].min() >= 0 and a["ids"].max() < 10 and a["mask"].dtype == bool
    assert all(np.array_equal(a[k], b[k]) for k in a) and not np.array_equal(a["x"], c["x"])
    assert make_inputs(specs, dynamic_size={"batch": 6})["x"].shape == (6, 3, 4, 4)
    assert make_inputs({"y": ((2, 2), "float16")})["y"].dtype == np.float16


def test_load_inputs_from_npz(tmp_path):
    feeds = {"image": np.random.rand(2, 3, 8, 8).astype(np.float32), "k": np.arange(3)}
    path = save_inputs(tmp_path / "samples.npz", feeds)
    back = load_inputs(path)
    assert list(back) == ["image", "k"] and all(np.array_equal(back[k], feeds[k]) for k in feeds)
    np.savez(tmp_path / "positional.npz", feeds["image"])
    assert list(load_inputs(tmp_path / "positional.npz", names=["input0"])) == ["input0"]
    with pytest.raises(ValueError, match="holds 1 arrays"):
        load_inputs(tmp_path / "positional.npz", names=["a", "b"])


# --------------------------------------------------------------------------------------- verify_chain

def _fn(scale=1.0, offset=0.0, fail=False):
    def run(feed):
        if fail:
            raise RuntimeError("runtime crashed")
        x = feed["input0"]
        return (x * 2 * scale + offset, [x.sum(axis=1) * scale])
    return run


def test_chain_names_the_stage_that_broke():
    feed = make_inputs([TensorSpec("input0", (2, 8))], seed=0)
    stages = [Stage("training", _fn()), Stage("plain", _fn()), Stage("onnx", _fn()),
              Stage("onnx-simplified", _fn(scale=1.001)),  # the simplifier changed the numbers
              Stage("openvino", _fn(scale=1.001)),  # converted from the simplified file: same numbers
              Stage("tflite", _fn(), parent="plain"),
              Stage("openvino-fp16", _fn(scale=1.004), parent="onnx", precision="fp16")]
    res = verify_chain(stages, feed)
    assert not res.passed and res.culprits == ["onnx-simplified"] and res.first_failure == "onnx-simplified"
    assert res["onnx"].passed and res["tflite"].passed and res["openvino-fp16"].passed
    assert res["openvino"].blame == "onnx-simplified" and not res["openvino"].introduced_mismatch
    assert res["openvino"].vs_parent.passed and not res["openvino"].vs_reference.passed
    assert res["onnx-simplified"].vs_parent is not None and not res["onnx-simplified"].vs_parent.passed
    assert res["training"].vs_reference is None
    assert "BROKE HERE" in res.summary().splitlines()[3]
    d = json.loads(json.dumps(res.to_dict()))
    assert d["culprits"] == ["onnx-simplified"] and len(d["stages"]) == 7


def test_chain_blames_a_stage_that_moves_away_from_a_wrong_parent_and_a_crash():
    feed = make_inputs([TensorSpec("input0", (2, 8))], seed=0)
    stages = [Stage("ref", _fn()), Stage("a", _fn(offset=0.1)), Stage("b", _fn(offset=0.2)),
              Stage("c", _fn(fail=True)), Stage("d", _fn(offset=0.3), parent="c")]
    res = verify_chain(stages, feed)
    assert res.culprits == ["a", "b", "c", "d"]
    assert "RuntimeError: runtime crashed" == res["c"].error
    with pytest.raises(ValueError, match="not an earlier stage"):
        verify_chain([Stage("ref", _fn()), Stage("x", _fn(), parent="later")], feed)


def test_chain_with_real_runners_blames_the_simplifier(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxsim")
    from export_models import capture, example, make

    from exporters import export
    from runtimes import OnnxRuntimeRunner, TorchRunner, open_runner

    model, x = make("convnet"), example()
    plain = capture(model, x)
    art = export("onnx", plain, tmp_path / "m.onnx", args=(x,))
    # what a numerically wrong simplifier would have written
    m = onnx.load(art.path)
    init = next(i for i in m.graph.initializer if len(i.dims) == 4)
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 1.01, init.name))
    onnx.save(m, art.path)
    stages = [Stage("training", TorchRunner(model, example_inputs=(x,))),
              Stage("plain", TorchRunner(plain, example_inputs=(x,))),
              Stage("onnx", OnnxRuntimeRunner(art.parent)),
              Stage("onnx-simplified", open_runner(art))]
    try:
        ov = export("openvino", art, tmp_path / "m.xml")
        stages.append(Stage("openvino", open_runner(ov)))
    except ImportError:
        pass
    res = verify_chain(stages, {"input0": x.numpy()})
    assert res.culprits == ["onnx-simplified"], res.summary()
    assert res["onnx"].vs_reference.max_rel <= 1e-5 and res["plain"].vs_reference.max_rel <= 1e-5
    assert res["onnx-simplified"].vs_parent.max_rel > 1e-4
    if "openvino" in [s.name for s in stages]:
        assert res["openvino"].blame == "onnx-simplified" and res["openvino"].vs_parent.passed
    assert all(not s.runner.is_active for s in stages)
    assert math.isfinite(res["onnx-simplified"].vs_reference.outputs[0].cosine)
