"""``deploy convert yolov7.pt --code-path REPO`` on checkpoints of the repository's training configs.

The checkpoints are built from the repository's own model code and configs (``tests/authors/yolov7``: yolov7-tiny,
yolov7, yolov7x, yolov7-w6, narrowed by ``width_multiple``) and saved as its ``train.py`` saves them
(``tests/yolov7_checkpoints.py``): a dict with half-precision ``model`` (train mode) and ``ema`` (eval mode,
different weights), pickled as objects of a ``models`` package that only ``--code-path`` makes importable.

Loading must pick ``ema`` and convert it to float32; converting must prove the deploy form equal to the model
(the pipeline's verification), leave no BatchNorm and no implicit layer, and for W6 leave out what its
``IAuxDetect`` computes in eval mode for no output: the auxiliary heads ``m2`` and the four layers feeding them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import fusers
from authors.yolov7_style import CONFIGS, Model, build
from deploy import zoo
from deploy.pipeline import ConvertOptions, convert
from deploy.sources import SourceError, load_model
from fusers.capture import describe_unused
from fusers.graph import fetch_attr, module_path, op_counts, op_name
from yolov7_checkpoints import INPUT_SIZE, write_checkpoint, write_code

pytest.importorskip("onnxruntime")  # deploy.pipeline's verification

# (index, module type, from) of layers the yaml files mark in comments, and each config's last layer
LANDMARKS = {
    "yolov7-tiny": [(7, "Conv", -1), (8, "MP", -1), (14, "Conv", -1), (21, "Conv", -1), (28, "Conv", -1),
                    (31, "SP", -1), (36, "Concat", [-1, -7]), (37, "Conv", -1), (40, "Conv", 21), (47, "Conv", -1),
                    (59, "Concat", [-1, 47]), (67, "Concat", [-1, 37]), (73, "Conv", -1), (76, "Conv", 73),
                    (77, "IDetect", [74, 75, 76])],
    "yolov7": [(11, "Conv", -1), (16, "Concat", [-1, -3]), (24, "Conv", -1), (29, "Concat", [-1, -3]),
               (37, "Conv", -1), (42, "Concat", [-1, -3]), (50, "Conv", -1), (51, "SPPCSPC", -1), (54, "Conv", 37),
               (63, "Conv", -1), (75, "Conv", -1), (80, "Concat", [-1, -3, 63]), (88, "Conv", -1),
               (93, "Concat", [-1, -3, 51]), (101, "Conv", -1), (102, "RepConv", 75), (104, "RepConv", 101),
               (105, "IDetect", [102, 103, 104])],
    "yolov7x": [(13, "Conv", -1), (18, "Concat", [-1, -3]), (28, "Conv", -1), (33, "Concat", [-1, -3]),
                (43, "Conv", -1), (48, "Concat", [-1, -3]), (58, "Conv", -1), (59, "SPPCSPC", -1), (62, "Conv", 43),
                (73, "Conv", -1), (87, "Conv", -1), (92, "Concat", [-1, -3, 73]), (102, "Conv", -1),
                (107, "Concat", [-1, -3, 59]), (117, "Conv", -1), (118, "Conv", 87), (121, "IDetect", [118, 119, 120])],
    "yolov7-w6": [(0, "ReOrg", -1), (1, "Conv", -1), (10, "Conv", -1), (19, "Conv", -1), (28, "Conv", -1),
                  (37, "Conv", -1), (46, "Conv", -1), (47, "SPPCSPC", -1), (50, "Conv", 37), (59, "Conv", -1),
                  (71, "Conv", -1), (83, "Conv", -1), (85, "Concat", [-1, 71]), (93, "Conv", -1), (103, "Conv", -1),
                  (105, "Concat", [-1, 47]), (113, "Conv", -1), (114, "Conv", 83), (117, "Conv", 113),
                  (118, "Conv", 83), (121, "Conv", 47), (122, "IAuxDetect", list(range(114, 122)))],
}
AUX_LAYERS = ("model.118", "model.119", "model.120", "model.121", "model.122.m2")  # W6: what only m2 reads


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    """A folder holding the repository's ``models`` package, as a clone of the repository would."""
    return write_code(tmp_path_factory.mktemp("yolov7_repo"))


@pytest.fixture(scope="module")
def checkpoints(code, tmp_path_factory):
    """``get(name)``: the checkpoint of training config ``name``, written once."""
    folder, made = tmp_path_factory.mktemp("weights"), {}

    def get(name):
        if name not in made:
            made[name] = write_checkpoint(folder / f"{name}.pt", code, name, seed=len(made))
        return made[name]

    return get


@pytest.fixture(autouse=True)
def _forget_the_models_package():
    """``load_model`` puts ``--code-path`` on ``sys.path`` and imports ``models`` from it; undo both after each
    test so that the next one (or another test file) imports its own."""
    path = list(sys.path)
    yield
    sys.path[:] = path
    for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
        del sys.modules[name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_configs_keep_the_repository_layout(name):
    model = build(name)
    last = LANDMARKS[name][-1][0]
    assert len(model.model) == last + 1
    for i, kind, frm in LANDMARKS[name]:
        assert (model.model[i].type.rsplit(".", 1)[-1], model.model[i].f) == (kind, frm), (name, i)
    detect = model.model[-1]
    nl = 4 if name == "yolov7-w6" else 3
    assert detect.nl == nl and model.stride.tolist() == [8.0, 16.0, 32.0, 64.0][:nl]
    size = INPUT_SIZE[name]
    with torch.no_grad():
        pred, raw = model.eval()(torch.zeros(1, 3, size, size))
    cells = sum((size // s) ** 2 for s in model.stride.int().tolist())
    assert pred.shape == (1, detect.na * cells, detect.no) and len(raw) == nl  # W6: the lead heads only


def test_e6_stem_blocks_reparameterize():
    """DownC (the E6 / D6 / E6E downsampler, not in the four configs above) after a ReOrg stem, as yolov7-e6
    starts, with an SPPCSPC and a one-level IDetect: folded exactly, nothing of BatchNorm or implicit left."""
    cfg = {"nc": 2, "anchors": [[10, 13, 16, 30, 33, 23]],
           "backbone": [[-1, 1, "ReOrg", []], [-1, 1, "Conv", [8, 3, 1]], [-1, 1, "DownC", [16]]],
           "head": [[-1, 1, "SPPCSPC", [8]], [[3], 1, "IDetect", ["nc", "anchors"]]]}
    model = Model(cfg)
    assert type(model.model[2]).__name__ == "DownC" and model.stride.tolist() == [4.0]
    zoo.randomize_batchnorm(model.eval())
    x = torch.randn(1, 3, 32, 32)
    assert len(implicit_layers(fusers.capture(model, (x,)))) == 2  # the check sees ImplicitA and ImplicitM
    deploy = fusers.reparameterize(model, (x,))
    report = deploy.reparam_report
    assert report.float32_error <= 1e-5 and "batch_norm" not in report.ops_after, report.summary()
    assert not implicit_layers(deploy) and report.ops_after["conv2d"] == report.ops_before["conv2d"] == 12


def test_checkpoint_is_what_train_py_saves(checkpoints):
    ck = checkpoints("yolov7-w6")
    found = torch.serialization.get_unsafe_globals_in_checkpoint(ck.path)
    assert {"models.yolo.Model", "models.yolo.IAuxDetect", "models.common.ReOrg", "models.common.SPPCSPC",
            "models.common.Conv", "models.common.ImplicitA"} <= set(found), found
    sys.path.insert(0, str(ck.code))
    raw = torch.load(ck.path, map_location="cpu", weights_only=False)
    assert sorted(raw) == sorted(["epoch", "best_fitness", "training_results", "model", "ema", "updates", "optimizer",
                                  "wandb_id"])
    assert raw["optimizer"] is None and raw["wandb_id"] is None and raw["updates"] == 2000
    assert raw["model"].training and not raw["ema"].training  # train.py saves the training model in train mode
    assert raw["ema"].model[0].__class__.__module__ == "models.common"
    for key in ("model", "ema"):
        floats = [t for t in raw[key].state_dict().values() if t.is_floating_point()]
        assert floats and all(t.dtype == torch.float16 for t in floats), key


def test_loading_needs_the_code_path(checkpoints, tmp_path_factory):
    ck = checkpoints("yolov7-tiny")  # earlier --code-path loads in this process (other tests') left nothing behind
    tmp = tmp_path_factory.getbasetemp().resolve()
    assert not [p for p in sys.path if Path(p or ".").resolve().is_relative_to(tmp)]
    assert not [n for n, m in list(sys.modules.items()) if n.split(".")[0] == "models"
                and Path(getattr(m, "__file__", None) or "/").resolve().is_relative_to(tmp)]
    with pytest.raises(SourceError, match=r"cannot unpickle .*No module named 'models(\.yolo)?'.*--code-path DIR"):
        load_model(str(ck.path), trust_pickle=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loading_picks_ema_in_float32(checkpoints, name):
    ck = checkpoints(name)
    loaded = load_model(str(ck.path), code_path=[str(ck.code)], trust_pickle=True)
    assert loaded.kind == "pickle" and loaded.checkpoint["key"] == "ema" and "(key 'ema')" in loaded.weights
    assert type(loaded.model).__module__ == "models.yolo" and not loaded.model.training
    assert any("half-precision weights; converted to float32" in n for n in loaded.notes), loaded.notes
    state = loaded.model.state_dict()
    assert state.keys() == ck.ema.keys()
    for k, v in state.items():
        assert torch.equal(v, ck.ema[k]), k  # ema's values, in float32
        if v.is_floating_point():
            assert v.dtype == torch.float32 and not torch.equal(v, ck.model[k]), k  # not the training model's


def _convert(ck, tmp_path):
    result = convert(ConvertOptions(model=str(ck.path), code_path=[str(ck.code)], trust_pickle=True,
                                    input_shape=ck.input_shape, targets=(), out=str(tmp_path / ck.name)))
    assert result.passed, [(s.name, s.verification.reason) for s in result.failed]
    assert [s.name for s in result.stages] == ["training", "pt2"]
    report = result.report
    assert report["model"]["checkpoint"]["key"] == "ema"
    assert any("half-precision" in n for n in report["notes"])
    rep = report["reparameterize"]
    assert rep["float64_error"] <= 1e-9 and rep["float32_error"] <= 1e-5
    assert rep["ops_before"]["batch_norm"] > 0 and "batch_norm" not in rep["ops_after"], rep["ops_after"]
    deploy = torch.export.load(tmp_path / ck.name / "model.deploy.pt2").module()
    assert "batch_norm" not in op_counts(deploy)
    assert not implicit_layers(deploy), f"ImplicitA / ImplicitM left in the deploy graph: {implicit_layers(deploy)}"
    return result, deploy


def implicit_layers(gm) -> list[str]:
    """The adds and multiplies by a (1, C, 1, 1) tensor of ``gm``: what ImplicitA / ImplicitM compute."""
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and op_name(n) in ("add", "mul")
            and any(a.op == "get_attr" and _is_channel_vector(fetch_attr(gm, a.target)) for a in n.all_input_nodes)]


def _is_channel_vector(t) -> bool:
    """A (1, C, 1, 1) tensor: what an ImplicitA / ImplicitM adds or multiplies."""
    return isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[0] == 1 and t.shape[2:] == (1, 1) and t.shape[1] > 1


def test_convert_tiny(checkpoints, tmp_path):
    ck = checkpoints("yolov7-tiny")
    result, _ = _convert(ck, tmp_path)
    rep = result.report["reparameterize"]
    assert rep["dead_ops"] == {} and rep["unused"] == ["model.77.anchors"]  # the loss's anchors, in grid units
    assert rep["ops_before"]["conv2d"] == rep["ops_after"]["conv2d"] == 58


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["yolov7", "yolov7x"])
def test_convert_p5(checkpoints, tmp_path, name):
    ck = checkpoints(name)
    result, _ = _convert(ck, tmp_path)
    rep = result.report["reparameterize"]
    assert rep["dead_ops"] == {} and len(rep["unused"]) == 1 and rep["unused"][0].endswith(".anchors")
    if name == "yolov7":  # three RepConv, each doubling the width (no identity branch): 1x1 merged into 3x3
        assert rep["merged"]["branch_groups_merged"] == 3 and rep["merged"]["branches_merged"] == 6
        assert rep["ops_after"]["conv2d"] == rep["ops_before"]["conv2d"] - 3


@pytest.mark.e2e
def test_convert_w6_drops_the_auxiliary_heads(checkpoints, tmp_path):
    ck = checkpoints("yolov7-w6")
    result, deploy = _convert(ck, tmp_path)
    rep = result.report["reparameterize"]
    assert rep["dead_ops"]["conv2d"] == 8  # four aux Conv layers and the four m2 heads
    assert rep["ops_after"]["conv2d"] == rep["ops_before"]["conv2d"] - 8
    assert len(rep["unused"]) == 4 * 6 + 4 * 2 + 1, rep["unused"]  # 4 Conv-BN layers, 4 m2 convs, anchors
    assert all(n.startswith(AUX_LAYERS) or n == "model.122.anchors" for n in rep["unused"]), rep["unused"]
    paths = {module_path(n) for n in deploy.graph.nodes if n.op == "call_function"}
    assert any(p.startswith("model.117") for p in paths), "the deploy graph names no module: check is vacuous"
    assert not [p for p in paths if p.startswith(AUX_LAYERS)], "auxiliary heads left in the deploy graph"
    assert sum(1 for n in deploy.graph.nodes if op_name(n) == "conv2d") == rep["ops_after"]["conv2d"]
    model = load_model(str(ck.path), code_path=[str(ck.code)], trust_pickle=True).model
    assert describe_unused(model, rep["unused"]) == [
        "model.118 (Conv, 6 tensors)", "model.119 (Conv, 6 tensors)", "model.120 (Conv, 6 tensors)",
        "model.121 (Conv, 6 tensors)", "model.122.anchors (buffer of IAuxDetect)",
        "model.122.m2 (ModuleList in IAuxDetect, 8 tensors)"]
