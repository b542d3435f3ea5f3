"""Model sources: parsing MODEL, the shipped trained default, strict checkpoints, pickled models, no network."""

from __future__ import annotations

import socket
import sys

import numpy as np
import pytest
import torch
from torch import nn

from deploy import sources, zoo
from deploy.sources import SourceError, load_checkpoint, load_model, parse_source, read_state_dict
from deploy.zoo import digits


def test_parse_source_kinds(tmp_path):
    assert parse_source("repvgg_a0") == ("zoo", "repvgg_a0", None)
    assert parse_source("timm:repvgg_a0") == ("timm", "repvgg_a0", None)
    assert parse_source("torchvision:resnet18") == ("torchvision", "resnet18", None)
    assert parse_source("nets/my.net.py:build_v2") == ("file", "nets/my.net.py", "build_v2")
    assert parse_source("C/x.py:f") == ("file", "C/x.py", "f")
    assert parse_source("best.pt") == ("pickle", "best.pt", None)
    assert parse_source("model.deploy.pt2") == ("pt2", "model.deploy.pt2", None)
    with pytest.raises(SourceError, match=r"names a Python file but no factory; write net.py:FACTORY"):
        parse_source("net.py")
    with pytest.raises(SourceError, match=r"not a function name"):
        parse_source("net.py:1x")
    with pytest.raises(SourceError, match=r"unknown model 'resnet9000'.*repvgg_digits"):
        parse_source("resnet9000")
    with pytest.raises(SourceError, match=r"timm:NAME"):
        parse_source("timm:")


# ----------------------------------------------------------------------------- the shipped default

def test_shipped_digits_model_is_small_trained_and_accurate():
    assert sources.DEFAULT_MODEL == "repvgg_digits" and zoo.has_weights("repvgg_digits")
    assert digits.WEIGHTS.stat().st_size < 1_000_000 and digits.TEST_SPLIT.stat().st_size < 200_000
    loaded = load_model()
    model = loaded.model
    assert loaded.trained and loaded.kind == "zoo" and loaded.input_shape == (1, 1, 8, 8)
    assert not any(m.training for m in model.modules())
    assert loaded.samples == str(digits.TEST_SPLIT)
    x, y = digits.load_test_split()
    assert x.shape == (360, 1, 8, 8) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert y.shape == (360,) and sorted(set(y.tolist())) == list(range(10)) and np.bincount(y).min() >= 35
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    record = digits.training_record()
    assert accuracy > 0.9 and accuracy == pytest.approx(record["test_accuracy"])
    assert record["test_samples"] == 360 and record["train_samples"] == 1437 and record["seed"] == 0
    blocks = [m for m in model.modules() if type(m).__name__ == "RepVGGBlock"]
    assert len(blocks) == 6 and sum(b.identity is not None for b in blocks) == 3
    # BatchNorm statistics come from training: far from the (0, 1) defaults
    bn = model.features[2].dense.bn
    assert bn.running_var.std() > 1e-3 and bn.running_mean.abs().max() > 1e-2
    with pytest.raises(ValueError, match="shipped repvgg_digits weights are for num_classes=10"):
        zoo.create("repvgg_digits", pretrained=True, num_classes=5)
    with pytest.raises(ValueError, match="has no shipped weights"):
        zoo.create("repvgg_a0", pretrained=True)


def test_training_script_reproduces_the_shipped_split(tmp_path):
    pytest.importorskip("sklearn")
    from deploy.zoo import train_digits

    x_train, y_train, x_test, y_test = train_digits.load_split()
    shipped_x, shipped_y = digits.load_test_split()
    assert np.array_equal(x_test, shipped_x) and np.array_equal(y_test, shipped_y)
    assert len(x_train) == 1437 and x_train.shape[1:] == (1, 8, 8)
    meta = train_digits.train(tmp_path, epochs=1, log=lambda _: None)
    state, saved = digits.load_weights(tmp_path / "repvgg_digits.pt")
    assert saved == meta and meta["epochs"] == 1 and 0.0 <= meta["test_accuracy"] <= 1.0
    assert state.keys() == digits.RepVGGDigits().state_dict().keys()
    with np.load(tmp_path / "digits_test.npz") as data:
        assert np.array_equal(data["labels"], shipped_y)


# --------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("nest,prefix", [(None, ""), ("state_dict", "module."), ("model", ""), ("ema", "module.")])
def test_checkpoint_nesting_and_prefixes(tmp_path, nest, prefix):
    trained = digits.repvgg_digits(pretrained=True)
    state = {prefix + k: v for k, v in trained.state_dict().items()}
    torch.save({nest: state, "epoch": 3} if nest else state, tmp_path / "ckpt.pt")
    model = digits.RepVGGDigits()
    info = load_checkpoint(model, tmp_path / "ckpt.pt")
    assert info["key"] == nest and info["stripped"] == ([prefix] if prefix else [])
    assert info["tensors"] == len(state) and len(info["sha256"]) == 64
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained.state_dict()[k]), k


def test_checkpoint_holding_a_module_and_a_lightning_prefix(tmp_path):
    trained = digits.repvgg_digits(pretrained=True)
    torch.save({"model": trained}, tmp_path / "whole.pt")
    model = digits.RepVGGDigits()
    with pytest.raises(SourceError, match=r"holds Python objects \(deploy\.zoo\.digits\.RepVGGDigits\); loading it "
                       r"runs code from it; pass --trust-pickle"):
        load_checkpoint(model, tmp_path / "whole.pt")  # a whole module is unpickled only when trusted
    assert load_checkpoint(model, tmp_path / "whole.pt", trust_pickle=True)["key"] == "model"
    assert torch.equal(model.head.fc.weight, trained.head.fc.weight)
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "pl.ckpt")
    info = load_checkpoint(digits.RepVGGDigits(), tmp_path / "pl.ckpt")
    assert info["stripped"] == ["model."]


def test_checkpoint_mismatch_is_refused_with_keys_and_shapes(tmp_path):
    state = digits.RepVGGDigits().state_dict()
    state.pop("features.0.dense.conv.weight")
    state["head.fc.weight"] = torch.zeros(5, 64)
    state["stray"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    model = digits.RepVGGDigits()
    before = model.head.fc.weight.clone()
    with pytest.raises(SourceError) as e:
        load_checkpoint(model, tmp_path / "bad.pt")
    msg = str(e.value)
    assert "1 missing key(s): features.0.dense.conv.weight" in msg and "1 unexpected key(s): stray" in msg
    assert "1 shape mismatch(es): head.fc.weight (checkpoint (5, 64), model (10, 64))" in msg
    assert torch.equal(model.head.fc.weight, before)  # nothing was loaded
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "opt.pt")
    with pytest.raises(SourceError, match=r"holds no state dict .*found: optimizer.*--checkpoint-key"):
        read_state_dict(tmp_path / "opt.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SourceError, match="not a torch checkpoint"):
        read_state_dict(tmp_path / "junk.pt")


def test_zoo_checkpoint_and_num_classes(tmp_path):
    ref = zoo.create("repvgg_a0", width=0.25, num_classes=7)
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "a0.pth")
    loaded = load_model("repvgg_a0", checkpoint=str(tmp_path / "a0.pth"), width=0.25, num_classes=7)
    assert loaded.trained and loaded.weights == f"checkpoint {tmp_path / 'a0.pth'}"
    assert torch.equal(loaded.model.head.fc.weight, ref.head.fc.weight)
    with pytest.raises(SourceError, match=r"shape mismatch.*--num-classes"):
        load_model("repvgg_a0", checkpoint=str(tmp_path / "a0.pth"), width=0.25)
    with pytest.raises(SourceError, match="--width applies to zoo models only"):
        load_model("timm:repvgg_a0", width=0.5)


# ----------------------------------------------------------------------------- pickled whole models

CODE = '''
from torch import nn


class TinyDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))
'''


@pytest.fixture
def yolo_style_checkpoint(tmp_path, monkeypatch):
    """A YOLOv7-style {'model': half-precision module, ...} whose class lives in code outside sys.path."""
    code = tmp_path / "repo"
    (code / "models").mkdir(parents=True)
    (code / "models" / "__init__.py").write_text("")
    (code / "models" / "tiny.py").write_text(CODE)
    monkeypatch.syspath_prepend(str(code))
    for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
        # not a code path's (the loader forgets those): a library's own, e.g. the namespace package that
        # onnxruntime.transformers' folder on sys.path gives an earlier test of this process
        monkeypatch.delitem(sys.modules, name)
    from models.tiny import TinyDetector

    model = TinyDetector()
    model.bn.running_mean.fill_(0.5)
    torch.save({"model": model.eval().half(), "epoch": 9, "ema": None}, tmp_path / "best.pt")
    torch.save({"model": TinyDetector().half()}, tmp_path / "train_mode.pt")
    sys.path.remove(str(code))
    for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
        del sys.modules[name]  # not monkeypatch.delitem: its undo would put this code's package back for later tests
    return tmp_path / "best.pt", code


def test_pickled_model_needs_its_code_path(yolo_style_checkpoint):
    ckpt, code = yolo_style_checkpoint
    refused = (r"holds Python objects \(models\.tiny\.TinyDetector\), as a whole pickled model does .*; loading it "
               r"runs code from it; pass --trust-pickle")
    with pytest.raises(SourceError, match=refused):  # refused before any class is imported or built
        load_model(str(ckpt))
    with pytest.raises(SourceError, match=r"cannot unpickle .*No module named 'models(\.tiny)?'.*--code-path DIR"):
        load_model(str(ckpt), trust_pickle=True)
    with pytest.raises(SourceError, match=r"--code-path only supplies the classes a pickled model is unpickled with.*"
                                          r"add --trust-pickle"):  # the code path serves unpickling only
        load_model(str(ckpt), code_path=[str(code)])
    loaded = load_model(str(ckpt), code_path=[str(code)], trust_pickle=True)
    assert loaded.kind == "pickle" and type(loaded.model).__name__ == "TinyDetector"
    assert loaded.model.conv.weight.dtype == torch.float32 and loaded.checkpoint["key"] == "model"
    assert any("half-precision" in n for n in loaded.notes)
    assert float(loaded.model.bn.running_mean[0]) == 0.5 and loaded.input_shape is None
    with pytest.raises(SourceError, match=r"saved in train mode .*--eval"):
        load_model(str(ckpt.parent / "train_mode.pt"), code_path=[str(code)], trust_pickle=True)
    assert not load_model(str(ckpt.parent / "train_mode.pt"), code_path=[str(code)], trust_pickle=True,
                          allow_train_mode=True).model.training
    with pytest.raises(SourceError, match="already holds its weights; drop --checkpoint"):
        load_model(str(ckpt), code_path=[str(code)], trust_pickle=True, checkpoint=str(ckpt))


def test_state_dict_passed_as_model_points_to_checkpoint(tmp_path):
    torch.save(digits.RepVGGDigits().state_dict(), tmp_path / "weights.pth")
    with pytest.raises(SourceError, match=r"holds only weights .*--checkpoint .*weights.pth"):
        load_model(str(tmp_path / "weights.pth"))
    with pytest.raises(SourceError, match="does not exist"):
        load_model(str(tmp_path / "absent.pt"))


def test_exported_program_source(tmp_path):
    model = digits.repvgg_digits(pretrained=True)
    ep = torch.export.export(model, (torch.zeros(1, 1, 8, 8),), strict=False)
    torch.export.save(ep, tmp_path / "digits.pt2")
    loaded = load_model(str(tmp_path / "digits.pt2"))
    assert loaded.kind == "pt2" and loaded.input_shape == (1, 1, 8, 8) and loaded.name == "digits"
    x = torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model(x))


# ---------------------------------------------------------------------------- timm and torchvision

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model source tried to open a network connection")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("spec,cls", [("timm:repvgg_a0", "ByobNet"), ("torchvision:resnet18", "ResNet")])
def test_hub_models_build_offline_with_random_weights(spec, cls, no_network):
    pytest.importorskip(spec.split(":")[0])
    loaded = load_model(spec, num_classes=10)
    model = loaded.model
    assert type(model).__name__ == cls and loaded.input_shape == (1, 3, 224, 224)
    assert not loaded.trained and loaded.weights.startswith("random (no network")
    assert not any(m.training for m in model.modules())
    out_features = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    assert out_features == 10
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and torch.cat([b.running_var for b in bns]).std() > 0.1  # randomized, not the (0, 1) init


def test_random_weights_leave_no_output_constant(no_network):
    """timm zero-initializes gMLP's classifier: with random weights every output would be its bias, and every
    verification of the model vacuous. The source draws such parameters anew (not the zero biases) and says so."""
    pytest.importorskip("timm")
    loaded = load_model("timm:gmlp_ti16_224")
    assert "1 all-zero parameter(s) drawn anew so that no output is constant (head.weight)" in loaded.weights
    model = loaded.model
    assert model.head.weight.std() > 0.01 and not model.head.bias.any()
    with torch.no_grad():
        a, b = model(torch.randn(1, 3, 224, 224)), model(torch.randn(1, 3, 224, 224))
    assert not torch.allclose(a, b)
    assert "drawn anew" not in load_model("timm:repvgg_a0").weights  # nothing zero there: nothing said


def test_zero_weights_are_drawn_by_seed_and_biases_kept():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2))
    for p in net.parameters():
        nn.init.zeros_(p)
    with torch.no_grad():
        assert zoo.randomize_zero_weights(net, seed=3) == ["0.weight", "1.weight"]
    first = net[0].weight.clone()
    assert not net[0].bias.any() and abs(float(first.std()) - 27 ** -0.5) < 0.1  # N(0, 1/fan_in), fan_in 3x3x3
    with torch.no_grad():
        nn.init.zeros_(net[0].weight)
        zoo.randomize_zero_weights(net, seed=3)  # the Linear's weight is no longer zero: left alone
    assert torch.equal(net[0].weight, first)


def test_torchvision_backbones_build_offline_with_random_weights(no_network):
    """torchvision's segmentation and detection builders take ImageNet weights for their backbone unless told
    not to: the source and the sweep's parameter count build them with none, without a connection."""
    pytest.importorskip("torchvision")
    from deploy.sweep import count_params

    loaded = load_model("torchvision:lraspp_mobilenet_v3_large")
    assert type(loaded.model).__name__ == "LRASPP" and not loaded.trained
    assert count_params("torchvision", "deeplabv3_resnet50") == 39_638_869  # not None: a size cap applies to it
    # RegNet's builder computes its widths with tensor values, which the meta device has not: its weights' record
    assert count_params("torchvision", "regnet_y_16gf") == 83_590_140


def test_torchvision_input_is_what_its_weights_were_trained_on(no_network):
    """The crop size and normalization of torchvision's default weights (read from their record), and a clip of
    16 frames for a video model: the shape timm models get from their pretrained_cfg."""
    tv = pytest.importorskip("torchvision")
    loaded = load_model("torchvision:r3d_18")
    assert loaded.input_shape == (1, 3, 16, 112, 112)
    assert loaded.preprocess == {"mean": [0.43216, 0.394666, 0.37645], "std": [0.22803, 0.22145, 0.216989]}
    assert sources._torchvision_input(tv, "inception_v3")[0] == (1, 3, 299, 299)
    assert sources._torchvision_input(tv, "mvit_v2_s")[0] == (1, 3, 16, 224, 224)
    assert sources._torchvision_input(tv, "lraspp_mobilenet_v3_large")[0] == (1, 3, 224, 224)  # no crop: 224


def test_unknown_hub_names(no_network):
    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    with pytest.raises(SourceError, match=r"timm has no model 'repvgg_zz'.*repvgg_a0"):
        load_model("timm:repvgg_zz")
    with pytest.raises(SourceError, match=r"torchvision has no model 'resnet9'"):
        load_model("torchvision:resnet9")
