"""Every zoo model through the compiler: one conv per block, no BatchNorm, exact numbers."""

import pytest
import torch

import fusers
from deploy import zoo
from deploy.zoo.acnet import ACBlock
from deploy.zoo.dbb import DiverseBranchBlock
from deploy.zoo.mobileone import MobileOneBlock
from deploy.zoo.repvgg import RepVGGBlock, SEBlock
from deploy.zoo.yolov7 import RepConv
from fusers.graph import CONV_OPS, module_path, op_counts
from fusers.rules import ROLLBACK_CODES

BLOCKS = (ACBlock, DiverseBranchBlock, MobileOneBlock, RepVGGBlock, RepConv)


def small(name):
    model = zoo.randomize_batchnorm(zoo.create(name, width=0.25), seed=1).eval()
    shape = (1, 3, 96, 96) if name == "yolov7_tiny_rep" else (1, zoo.input_shape(name)[1], 48, 48)
    return model, torch.randn(*shape)


# the reparameterization families (the seed-paper architectures are in test_zoo_papers_*.py)
FAMILIES = ["acnet_resnet", "dbb_resnet", "mobileone_s0", "repvgg_a0", "repvgg_a0_se", "repvgg_a1", "repvgg_b0",
            "repvgg_b1g2", "resnet_small", "yolov7_tiny_rep"]


@pytest.mark.parametrize("name", FAMILIES)
def test_zoo_model_becomes_plain_and_exact(name):
    model, x = small(name)
    deploy = fusers.reparameterize(model, (x,))
    report = deploy.reparam_report
    ops = op_counts(deploy)
    assert "batch_norm" not in ops, report.summary()
    assert report.float64_error <= 1e-9
    assert report.float32_error <= 1e-5
    with torch.no_grad():
        assert fusers.numerics.max_rel_error(model(x), deploy(x)) <= 1e-5
    # every multi-branch block is exactly one conv in the deploy graph
    conv_paths = [module_path(n) for n in deploy.graph.nodes if n.target in CONV_OPS]
    blocks = [p for p, m in model.named_modules() if isinstance(m, BLOCKS)]
    se = tuple(p + "." for p, m in model.named_modules() if isinstance(m, SEBlock))
    conv_paths = [p for p in conv_paths if not (p + ".").startswith(se)]
    assert blocks or name in ("yolov7_tiny_rep", "resnet_small")
    for path in blocks:
        inside = [p for p in conv_paths if p == path or p.startswith(path + ".")]
        assert len(inside) == 1, f"{path}: {len(inside)} convs"
    assert not [r for r in report.refusals() if r.code in ROLLBACK_CODES]


def test_repvgg_a0_deploy_matches_the_published_architecture():
    model = zoo.randomize_batchnorm(zoo.create("repvgg_a0")).eval()
    deploy = fusers.reparameterize(model, (torch.randn(1, 3, 64, 64),))
    ops = op_counts(deploy)
    assert ops["conv2d"] == 22 and "add" not in ops and "batch_norm" not in ops
    assert sum(p.numel() for p in deploy.parameters()) == 8_309_384  # published: 8.30 M


def test_yolov7_detect_head_keeps_its_structure_and_folds_implicit_layers():
    model, x = small("yolov7_tiny_rep")
    deploy = fusers.reparameterize(model, (x,))
    with torch.no_grad():
        boxes, maps = deploy(x)
    assert boxes.shape[-1] == 85 and len(maps) == 3
    # ImplicitA / ImplicitM parameters are gone: folded into the detect convs
    assert not [n for n, _ in deploy.named_parameters() if "ia" in n.split("_") or "im" in n.split("_")]
    assert fusers.last_report() is deploy.reparam_report


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "dbb_resnet"])
def test_onnx_export_of_the_deploy_model_has_no_batchnorm(name, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model, x = small(name)
    deploy = fusers.reparameterize(model, (x,))
    path = tmp_path / "m.onnx"
    torch.onnx.export(deploy, (x,), str(path), dynamo=True, external_data=False)
    types = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "BatchNormalization" not in types
    assert ("Add" in types) == (name == "dbb_resnet")  # only the ResNet's residuals remain
    assert types.count("Conv") == op_counts(deploy)["conv2d"]
