"""YOLOv7 written the way its authors write it (``tests/authors/yolov7_style.py``), against the repository's
own ``Model.fuse`` (house style item 12).

IDetect's eval forward decodes boxes with in-place slice writes (``y[..., 0:2] = ...``, captured by
``torch.export`` as ``slice`` + ``copy_``); the repository's fuse form folds the implicit layers into the
output convs and, while exporting to ONNX, decodes with ``split`` + ``cat`` instead. Our deploy form must
compute the model's function, and exported the same way as the fuse form (``exporters.export``:
torch.export, the dynamo exporter, onnxsim) it must be no bigger: no ScatterND, no BatchNormalization,
no more nodes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fusers
from authors.yolov7_style import IDetect, ImplicitA, ImplicitM, RepConv, onnx_export_branch, tiny
from fusers.graph import op_counts
from fusers.numerics import max_rel_error
from helpers import randomize_bn

TOL = 1e-5
SIZE = 64


def prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with BatchNorm statistics and implicit layers far from the identity (the
    repository initialises ImplicitA near 0 and ImplicitM near 1, which would hide a wrong fold)."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ImplicitA):
                m.implicit.copy_(torch.randn(m.implicit.shape, generator=g) * 0.5)
            elif isinstance(m, ImplicitM):
                m.implicit.copy_(torch.rand(m.implicit.shape, generator=g) + 0.5)
    return randomize_bn(model, seed)


@pytest.fixture(scope="module")
def case():
    """(model, input, the model's outputs, the repository's fuse form of a copy)."""
    torch.manual_seed(0)
    model = prepared(tiny())
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        theirs = copy.deepcopy(model).fuse().eval()  # IDetect.fuse updates parameters in place
    return model, x, ref, theirs


@pytest.fixture(scope="module")
def ours(case):
    model, x, _, _ = case
    return fusers.reparameterize(model, (x,))


def test_fixture_decodes_with_in_place_slice_writes(case, ours):
    model = case[0]
    assert isinstance(model.model[-1], IDetect) and sum(isinstance(m, RepConv) for m in model.modules()) == 3
    assert any(m.rbr_identity is None for m in model.modules() if isinstance(m, RepConv))
    captured = ours.reparam_report.ops_before  # the op counts of the graph torch.export captured
    assert captured.get("copy_", 0) == 6 and captured.get("slice", 0) >= 6, captured  # 2 writes x 3 levels


def test_fixture_fuse_form_agrees_with_the_model(case):
    """Sanity of the fixture: the authors' conversion computes the model's function in both of its decode
    branches (in-place writes in eager mode, split + cat while exporting), and leaves no BatchNorm."""
    _, x, ref, theirs = case
    assert not any(isinstance(m, nn.BatchNorm2d) for m in theirs.modules())
    with torch.no_grad():
        eager = theirs(x)
        with onnx_export_branch():
            exporting = theirs(x)
    assert max_rel_error(ref, eager) <= TOL
    assert max_rel_error(ref, exporting) <= TOL


def test_ours_computes_the_model(case, ours):
    model, x, ref, _ = case
    report = ours.reparam_report
    assert report.float64_error <= 1e-9, report.summary()
    with torch.no_grad():
        out = ours(x)
    assert max_rel_error(ref, out) <= TOL, report.summary()
    assert "batch_norm" not in op_counts(ours), report.summary()


@pytest.mark.e2e
def test_ours_onnx_is_no_bigger_than_the_fuse_form(case, ours, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxsim")
    from exporters import export
    from exporters.onnx import op_counts as onnx_ops
    from runtimes import open_runner

    _, x, ref, theirs = case
    with onnx_export_branch():  # the fuse form as the repository's export.py gets it: split + cat
        theirs_ep = torch.export.export(theirs, (x,), strict=False)
    arts = {"ours": export("onnx", ours, tmp_path / "ours.onnx", args=(x,)),
            "theirs": export("onnx", theirs_ep, tmp_path / "theirs.onnx", args=(x,))}
    ops = {name: onnx_ops(art.path) for name, art in arts.items()}
    for name, art in arts.items():
        with open_runner(art) as runner:
            out = list(runner.infer([x.numpy()]).values())
        assert max_rel_error(ref, out) <= TOL, f"{name} ONNX differs from the model"
    assert ops["theirs"].get("ScatterND", 0) == 0, ops["theirs"]
    diff = {op: (ops["ours"].get(op, 0), ops["theirs"].get(op, 0))
            for op in sorted(set(ops["ours"]) | set(ops["theirs"])) if ops["ours"].get(op, 0) != ops["theirs"].get(op, 0)}
    message = (f"ours {sum(ops['ours'].values())} nodes, fuse form {sum(ops['theirs'].values())}; ours vs theirs: "
               + ", ".join(f"{op} {a} vs {b}" for op, (a, b) in diff.items()))
    assert "ScatterND" not in ops["ours"], message
    assert "BatchNormalization" not in ops["ours"], message
    assert sum(ops["ours"].values()) <= sum(ops["theirs"].values()), message
