"""deploy doctor: the first divergence of an fp32 stage, the INT8 table, the smallest failing subgraph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="deploy doctor reads ONNX files (pip install 'reparam-deploy[onnx]')")
pytest.importorskip("onnxruntime", reason="deploy doctor runs ONNX files on ONNX Runtime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from deploy import doctor as dr  # noqa: E402
from deploy.cli import main  # noqa: E402
from deploy.record import (ExportRecord, FilesRecord, InputsRecord, RunOptions, RunRecord,  # noqa: E402
                           StageRecord)


def chain_model(bad_op: str = "Hardmax", before: int = 10, after: int = 9):
    """``before`` ordinary nodes, one ``bad_op``, ``after`` ordinary nodes: a chain on a (1, 4, 4) input."""
    nodes, cur = [], "x"
    for i in range(before):
        nodes.append(helper.make_node("Relu" if i % 2 else "Sigmoid", [cur], [f"a{i}"], name=f"pre{i}"))
        cur = f"a{i}"
    nodes.append(helper.make_node(bad_op, [cur], ["bad"], name="bad"))
    cur = "bad"
    for i in range(after):
        nodes.append(helper.make_node("Relu" if i % 2 else "Neg", [cur], [f"b{i}"], name=f"post{i}"))
        cur = f"b{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4])],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [1, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def has_op(op):
    def check(path, folder):
        found = [n.op_type for n in onnx.load(path).graph.node]
        return f"the runtime rejects {op} at {path}" if op in found else ""
    return check


# ------------------------------------------------------------------------------------------ reduction

def test_reduce_finds_the_one_rejected_node_in_few_checks():
    lines = []
    red = dr.reduce_onnx(chain_model(), has_op("Hardmax"), progress=lines.append)
    assert red.ops == ["Hardmax"] and red.nodes == 1 and red.original_nodes == 20
    assert red.complete and red.checks <= 12  # 1 + ~log2(20) for the prefix + ~log2(11) for the suffix
    assert red.message == "the runtime rejects Hardmax at the subgraph"
    assert lines[0] == "check 1/40: the whole model (20 nodes): fails" and len(lines) == red.checks
    onnx.checker.check_model(red.model)
    assert [i.name for i in red.model.graph.input] == ["a9"]  # the cut tensor became an input, shaped by inference
    dims = [d.dim_value for d in red.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 4, 4]


def test_reduce_keeps_initializers_and_a_failure_of_another_kind_counts_as_passing():
    model = chain_model()
    w = numpy_helper.from_array(np.ones((1, 4, 4), np.float32), "w")
    model.graph.initializer.append(w)
    model.graph.node.insert(11, helper.make_node("Add", ["bad", "w"], ["bad_w"], name="add_w"))
    model.graph.node[12].input[0] = "bad_w"

    def check(path, folder):  # Hardmax is the failure; a graph holding only Sigmoid fails differently
        ops = [n.op_type for n in onnx.load(path).graph.node]
        if "Hardmax" in ops and "Add" in ops:
            return "rejects the pair Hardmax -> Add"
        return "something else entirely" if ops == ["Sigmoid"] else ""

    red = dr.reduce_onnx(model, check)
    assert red.ops == ["Hardmax", "Add"]
    assert [i.name for i in red.model.graph.initializer] == ["w"]


def test_reduce_says_when_the_whole_model_passes_and_stops_at_the_budget():
    red = dr.reduce_onnx(chain_model(), has_op("Det"))
    assert red.model is None and red.checks == 1
    red = dr.reduce_onnx(chain_model(), has_op("Hardmax"), max_checks=3)
    assert not red.complete and red.checks == 3 and red.nodes == 15  # nodes 0..14, the best found in 3 checks


def test_forked_check_reports_a_crash_and_a_hang():
    import os
    import time

    assert dr._forked(lambda: os._exit(3), (), 10) == "the check crashed (exit status 3)"
    assert dr._forked(lambda: time.sleep(30), (), 0.5) == "the check ran past 0.5 s"
    assert dr._forked(lambda: "rejected", (), 10) == "rejected"


# ------------------------------------------------------------------------- a run directory made by hand

def hand_run(root: Path, model, failing: str = "mnn", error: str = "MNN cannot convert model.onnx: Hardmax") -> Path:
    """A run directory with the fp32 ONNX stage ``model`` and a ``failing`` stage whose export failed."""
    from exporters.onnx import describe_onnx

    root.mkdir()
    onnx.save(model, root / "model.onnx")
    art = describe_onnx(root / "model.onnx")
    art.path = "model.onnx"
    stages = [StageRecord("training", ExportRecord("torch")),
              StageRecord("onnx", ExportRecord("onnx", parent="pt2", artifact=art),
                          FilesRecord.of(root, ["model.onnx"])),
              StageRecord(failing, ExportRecord(failing, parent="onnx", error=error))]
    stages[1].verification.passed = True
    record = RunRecord(model={"spec": "hand"}, load={}, options=RunOptions(targets=["onnx", failing]),
                       inputs=InputsRecord([1, 4, 4], [1, 4, 4]), tolerance={}, reparameterize={}, stages=stages)
    (root / "report.json").write_text(json.dumps(record.to_dict()))
    return root


def test_doctor_reduces_an_mnn_export_failure_to_the_rejected_op(tmp_path, capsys):
    pytest.importorskip("MNN", reason="the MNN converter is the runtime that rejects Hardmax here")
    run = hand_run(tmp_path / "run", chain_model())
    assert main(["doctor", str(run), "-q"]) == 0
    out = capsys.readouterr().out
    reduced = run / "doctor" / "reduced.onnx"
    assert f"mnn's export fails on a 1-node subgraph (Hardmax) of model.onnx: {reduced} reproduces it" in out
    model = onnx.load(reduced)
    assert len(model.graph.node) <= 3 and [n.op_type for n in model.graph.node] == ["Hardmax"]
    assert "does not support the ONNX op(s) Hardmax" in dr.target_check("mnn", reduced, tmp_path)
    assert dr.target_check("mnn", run / "model.onnx", tmp_path)  # the whole model fails the same way
    # again, as JSON: the file is replaced, and said so
    assert main(["doctor", str(run), "-q", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["diagnoses"][0]
    assert found["kind"] == "failure" and found["details"]["nodes"] == 1 and found["details"]["ops"] == ["Hardmax"]
    assert f"replaced the previous {reduced}" in found["notes"]


def test_doctor_refuses_bad_input_in_one_sentence(tmp_path, capsys):
    run = hand_run(tmp_path / "run", chain_model())
    assert main(["doctor", str(run), "--stage", "nope"]) == 2
    assert capsys.readouterr().err == (f"deploy doctor: error: {run} has no stage 'nope'; its stages are training, "
                                       "onnx, mnn.\n")
    assert main(["doctor", str(run), "--stage", "training"]) == 2
    assert "the training stage is the reference" in capsys.readouterr().err
    assert main(["doctor", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"deploy doctor: error: {tmp_path} holds no report.json; pass the output "
                                       "directory of deploy convert.\n")
    report = json.loads((run / "report.json").read_text())
    report["stages"][1]["export"]["artifact"]["path"] = "../elsewhere.onnx"
    (run / "report.json").write_text(json.dumps(report))
    assert main(["doctor", str(run), "--stage", "mnn"]) == 2
    err = capsys.readouterr().err
    assert "'../elsewhere.onnx', which is outside the run directory" in err and "Traceback" not in err


def test_doctor_refuses_external_weights(tmp_path, capsys):
    model = chain_model()
    w = model.graph.initializer.add()
    w.name, w.data_type, w.data_location = "w", TensorProto.FLOAT, TensorProto.EXTERNAL
    w.external_data.add(key="location", value="/etc/passwd")
    run = hand_run(tmp_path / "run", model)
    assert main(["doctor", str(run)]) == 2
    assert "keeps weights in external files, which a run never writes: refused" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ real conversions

def convert(tmp_path, *extra) -> Path:
    out = tmp_path / "run"
    assert main(["convert", "repvgg_digits", "--targets", "onnx", "--out", str(out), "-q", *extra]) == 0
    return out


@pytest.mark.e2e
def test_doctor_names_the_layer_whose_weight_was_changed(tmp_path, capsys):
    run = convert(tmp_path)
    capsys.readouterr()
    assert main(["doctor", str(run), "-q"]) == 0
    assert "every stage of" in capsys.readouterr().out  # nothing failed, nothing changed
    path = run / "model.onnx"
    model = onnx.load(path)
    init = next(i for i in model.graph.initializer if i.name == "features_3_weight")
    w = numpy_helper.to_array(init).copy()
    w[0, 0, 1, 1] += 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, path)
    assert main(["doctor", str(run), "-q", "--json"]) == 0
    [found] = json.loads(capsys.readouterr().out)["diagnoses"]
    assert found["stage"] == "onnx" and found["kind"] == "divergence"
    assert found["details"]["layer"] == "conv2d_3" and found["details"]["changed"] == ["model.onnx"]
    first = found["details"]["first"]
    assert first["op"] == "Conv" and first["max_rel"] > 1e-2
    inputs = {i["tensor"]: i for i in first["inputs"]}
    assert inputs["relu_2"]["passed"] and inputs["relu_2"]["max_rel"] < 1e-5  # what feeds it was fine
    assert not inputs["features_3_weight"]["passed"] and inputs["features_3_bias"]["max_rel"] == 0
    assert found["conclusion"].startswith("onnx first diverges at conv2d_3 (Conv): max rel error ")
    assert "its weight features_3_weight differs from the plain graph's" in found["conclusion"]
    assert found["notes"][0].startswith("model.onnx changed since conversion")
    # the simplified file was not touched: every compared tensor agrees
    assert main(["doctor", str(run), "-q", "--stage", "onnx-simplified"]) == 0
    out = capsys.readouterr().out
    assert "onnx-simplified: every one of the 13 compared tensors agrees with the plain graph within rtol 1e-05" in out


@pytest.mark.e2e
def test_doctor_int8_gives_the_layer_table_worst_first(tmp_path, capsys):
    run = convert(tmp_path, "--precision", "int8")
    capsys.readouterr()
    assert main(["doctor", str(run), "-q", "--stage", "onnx-int8", "--json"]) == 0
    [found] = json.loads(capsys.readouterr().out)["diagnoses"]
    layers = found["details"]["layers"]
    assert len(layers) == 7 and [r["op"] for r in layers].count("Conv") == 6
    lost = [r["lost_db"] for r in layers]
    assert lost == sorted(lost, reverse=True) and lost[0] > 3  # worst first; the worst loses several dB
    assert found["conclusion"].startswith(f"onnx-int8 passes the guard and loses most in {layers[0]['name']} "
                                          f"({lost[0]:.1f} dB)")
    # the same run judged failing (as a stricter bound would): the ranking suggests the float scope
    report = json.loads((run / "report.json").read_text())
    stage = next(s for s in report["stages"] if s["name"] == "onnx-int8")
    stage["verification"]["passed"] = False
    (run / "report.json").write_text(json.dumps(report))
    assert main(["doctor", str(run), "-q"]) == 0
    out = capsys.readouterr().out
    assert (f"onnx-int8 fails the guard and loses most in {layers[0]['name']} ({lost[0]:.1f} dB); keep "
            f"{layers[0]['name']}, {layers[1]['name']} in float first") in out


@pytest.mark.e2e
def test_doctor_compares_openvino_intermediates_by_their_onnx_names(tmp_path, capsys):
    ov = pytest.importorskip("openvino", reason="the OpenVINO stage needs openvino")
    from openvino import opset13

    out = tmp_path / "run"
    assert main(["convert", "repvgg_digits", "--targets", "onnx,openvino", "--out", str(out), "-q"]) == 0
    core = ov.Core()
    model = core.read_model(str(out / "model.xml"))
    conv = next(op for op in model.get_ordered_ops() if op.get_friendly_name() == "node_conv2d_4/WithoutBiases")
    weight = conv.input_value(1).get_node()
    w = weight.get_data().copy()
    w[1, 0, 0, 0] -= 0.5
    weight.output(0).replace(opset13.constant(w).output(0))
    ov.save_model(model, str(tmp_path / "model.xml"), compress_to_fp16=False)  # not over the mapped .bin
    del model, conv, weight
    for suffix in (".xml", ".bin"):
        (tmp_path / f"model{suffix}").replace(out / f"model{suffix}")
    capsys.readouterr()
    assert main(["doctor", str(out), "-q", "--json"]) == 0
    [found] = json.loads(capsys.readouterr().out)["diagnoses"]
    assert found["stage"] == "openvino" and found["details"]["layer"] == "conv2d_4"
    assert sorted(found["details"]["changed"]) == ["model.bin", "model.xml"]
    assert [i["tensor"] for i in found["details"]["first"]["inputs"]] == ["relu_3"]  # weights are not OpenVINO's
    assert found["conclusion"].startswith("openvino first diverges at conv2d_4 (Conv)")


# ------------------------------------------------------------------------------- TFLite: matching by location

torch = pytest.importorskip("torch", reason="deploy doctor runs the plain graph with torch")


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.act = torch.nn.ReLU(inplace=True)
        self.fc = torch.nn.Linear(48, 5)

    def forward(self, x):
        x = self.act(self.conv(x))
        return self.fc(torch.flatten(x, 1))


def tiny_tflite():
    """A tiny plain graph (conv, relu, flatten, linear) and the TFLite graph litert-torch lowers it to, written by
    hand: NCHW -> NHWC transpose, CONV_2D with a fused RELU (named after both locations, as litert-torch does),
    NHWC -> NCHW transpose, reshape, FULLY_CONNECTED (renamed after the signature); values from the plain graph."""
    torch.manual_seed(0)
    program = torch.export.export(_Head().eval(), (torch.randn(1, 2, 4, 4),)).run_decompositions({})
    x = np.random.default_rng(0).normal(size=(3, 2, 4, 4)).astype(np.float32)
    plain, _ = dr._record_plain(program, x, 1)
    gm = program.module()
    nodes = {n.name: n for n in gm.graph.nodes}
    loc = {k: dr._litert_location(nodes[k]) for k in ("conv2d", "relu", "linear")}
    names = ["serving_default_args_0", "perm", f"{loc['conv2d']};", "w", "b", f"{loc['relu']};;{loc['conv2d']};1",
             "perm_back", f"{loc['relu']};;{loc['conv2d']};2", "shape", f"{loc['linear']};", f"{loc['linear']};1",
             "serving_default_output_0"]
    shapes = [(1, 2, 4, 4), (4,), (1, 4, 4, 2), (3, 3, 3, 2), (3,), (1, 4, 4, 3), (4,), (1, 3, 4, 4), (2,), (5, 48),
              (5,), (1, 5)]
    ops = [dr._TflOp(0, "TRANSPOSE", [0, 1], [2], 0), dr._TflOp(1, "CONV_2D", [2, 3, 4], [5], 1),
           dr._TflOp(2, "TRANSPOSE", [5, 6], [7], 0), dr._TflOp(3, "RESHAPE", [7, 8], [12], 0),
           dr._TflOp(4, "FULLY_CONNECTED", [12, 9, 10], [11], 0)]
    names.append("reshaped")
    shapes.append((1, 48))
    floats = {0, 2, 3, 4, 5, 7, 9, 10, 11, 12}
    graph = dr._TflGraph(names, shapes, floats, {1, 3, 4, 6, 8, 9, 10}, ops, [0], [11], {"output_0": 11})
    values = {0: x, 1: np.array([0, 2, 3, 1]), 2: x.transpose(0, 2, 3, 1),
              3: plain["conv_weight"].transpose(0, 2, 3, 1), 4: plain["conv_bias"],
              5: plain["relu"].transpose(0, 2, 3, 1), 6: np.array([0, 3, 1, 2]), 7: plain["relu"],
              8: np.array([1, 48]), 9: plain["fc_weight"], 10: plain["fc_bias"], 11: plain["linear"],
              12: plain["relu"].reshape(len(x), -1)}
    return graph, gm, plain, values


def test_tflite_tensors_are_matched_by_location_kind_and_inputs():
    graph, gm, plain, values = tiny_tflite()
    found = dr.tflite_divergence(graph, gm, plain, values, 1e-5, output_order=["output_0"])
    assert found["first"] is None and found["unmatched"] == []
    rows = found["compared"]
    assert [(r["layer"], r["tensor"], r["op"]) for r in rows] == [("conv2d", "relu", "CONV_2D+RELU"),
                                                                  ("linear", "linear", "FULLY_CONNECTED")]
    assert all(r["max_rel"] == 0 for r in rows)  # the NHWC tensor was compared with the NCHW one permuted
    assert {i["tensor"]: i["kind"] for i in rows[0]["inputs"]} == {"conv_weight": "weight", "conv_bias": "weight"}
    assert [i["tensor"] for i in rows[1]["inputs"]] == ["relu", "fc_weight", "fc_bias"]  # through the flatten


def test_tflite_divergence_names_the_layer_whose_weight_changed():
    graph, gm, plain, values = tiny_tflite()
    values[3] = values[3].copy()
    values[3][1, 0, 0, 0] += 0.5
    values[5] = values[5] * np.array([1, 1.01, 1], np.float32)  # what the changed kernel would compute: channel 1
    found = dr.tflite_divergence(graph, gm, plain, values, 1e-5)
    first = found["first"]
    assert first["layer"] == "conv2d" and first["op"] == "CONV_2D+RELU" and not first["passed"]
    weights = {i["tensor"]: i["passed"] for i in first["inputs"]}
    assert weights == {"conv_weight": False, "conv_bias": True}


def test_tflite_tensor_of_an_unknown_location_is_left_unmatched_not_guessed():
    graph, gm, plain, values = tiny_tflite()
    graph.names[5] = "some.Other_module;1"
    found = dr.tflite_divergence(graph, gm, plain, values, 1e-5)
    assert found["compared"] == []  # the FULLY_CONNECTED's input is unmatched, so it is not matched either
    assert [why for _, why in found["unmatched"]] == ["0 plain nodes fit its location, kind and inputs",
                                                      "its inputs are not matched"]


@pytest.mark.e2e
def test_doctor_compares_tflite_intermediates_and_names_the_changed_layer(tmp_path, capsys):
    pytest.importorskip("litert_torch", reason="the TFLite stage needs litert-torch")
    pytest.importorskip("ai_edge_litert", reason="the TFLite stage runs on LiteRT")
    from runtimes.safe_load import load_program

    out = tmp_path / "run"
    assert main(["convert", "repvgg_digits", "--targets", "onnx,tflite", "--out", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["doctor", str(out), "-q", "--stage", "tflite", "--json"]) == 0
    [found] = json.loads(capsys.readouterr().out)["diagnoses"]
    assert found["conclusion"] == ("tflite: every one of the 8 compared tensors agrees with the plain graph within "
                                   "rtol 1e-05")  # 6 convolutions with their relu, the mean, the linear
    assert found["details"]["unmatched"] == 0 and found["details"]["layer"] is None
    assert "litert-torch's location names" in found["notes"][1]
    # one weight of conv2d_3 changed in the flatbuffer's bytes (TFLite keeps it OHWI)
    w = load_program(out / "model.deploy.pt2").module().features_3_weight.detach().numpy()
    packed = np.ascontiguousarray(w.transpose(0, 2, 3, 1), "<f4").tobytes()
    data = bytearray((out / "model.tflite").read_bytes())
    at = data.find(packed)
    assert at > 0 and data.find(packed, at + 1) < 0
    data[at:at + 4] = np.array([w[0, 0, 0, 0] * 3], "<f4").tobytes()
    (out / "model.tflite").write_bytes(bytes(data))
    assert main(["doctor", str(out), "-q", "--json"]) == 0
    [found] = json.loads(capsys.readouterr().out)["diagnoses"]
    assert found["stage"] == "tflite" and found["kind"] == "divergence" and found["details"]["layer"] == "conv2d_3"
    assert found["details"]["changed"] == ["model.tflite"]
    first = found["details"]["first"]
    assert first["op"] == "CONV_2D+RELU" and first["tensor"] == "relu_3" and first["max_rel"] > 1e-3
    inputs = {i["tensor"]: i for i in first["inputs"]}
    assert inputs["relu_2"]["passed"] and inputs["relu_2"]["max_rel"] < 1e-5  # what feeds it was fine
    assert not inputs["features_3_weight"]["passed"] and inputs["features_3_bias"]["max_rel"] == 0
    assert found["conclusion"].startswith("tflite first diverges at conv2d_3 (CONV_2D+RELU): max rel error ")
    assert "its weight features_3_weight differs from the plain graph's" in found["conclusion"]
    assert found["details"]["compared"] == 4 and [r[-1] for r in found["rows"]][-1] == "FIRST DIVERGENCE"
