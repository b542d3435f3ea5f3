"""The result of ``fusers.reparameterize`` behaves as an ordinary ``nn.Module``."""

import copy
import io
import shutil

import pytest
import torch
from torch import nn

import fusers
from deploy import zoo
from fusers.numerics import max_rel_error

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def model(seed: int = 0) -> nn.Module:
    return zoo.randomize_batchnorm(zoo.create("repvgg_a0", width=0.0625), seed=seed).eval()


@pytest.fixture(scope="module")
def _made():
    trained = model()
    return trained, fusers.reparameterize(trained, (X,))


@pytest.fixture
def trained(_made):
    return copy.deepcopy(_made[0])


@pytest.fixture
def plain(_made):
    """A fresh copy of one reparameterized model per test (the passes run once per module)."""
    return copy.deepcopy(_made[1])


def run(module, x=X):
    with torch.no_grad():
        return module(x)


def test_eval_and_train_switch_the_flags_and_keep_the_function(plain, trained):
    ref = run(trained)
    assert not plain.training
    assert plain.train() is plain and all(m.training for m in plain.modules())
    torch.testing.assert_close(run(plain), ref, rtol=1e-5, atol=1e-5)  # the deploy graph has no train mode
    assert plain.eval() is plain and not any(m.training for m in plain.modules())
    plain.train(True)
    assert plain.train(False) is plain and not plain.training
    torch.testing.assert_close(run(plain), ref, rtol=1e-5, atol=1e-5)
    again = torch.export.export(plain, (X,), strict=False).module()  # still exports after .eval()
    torch.testing.assert_close(run(again), run(plain), rtol=0, atol=0)


def test_nested_in_a_sequential_that_is_switched_to_eval(plain, trained):
    seq = nn.Sequential(plain, nn.Softmax(dim=1))
    seq.train()
    assert plain.training
    seq.eval()
    assert not plain.training
    torch.testing.assert_close(run(seq), run(trained).softmax(1), rtol=1e-5, atol=1e-6)


def test_deepcopy_is_independent_and_keeps_the_report(plain):
    ref = run(plain)
    twin = copy.deepcopy(plain)
    assert torch.equal(run(twin), ref)
    assert twin.reparam_report.count() == plain.reparam_report.count() > 0
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(2)
    assert not torch.equal(run(twin), ref) and torch.equal(run(plain), ref)


def test_state_dict_round_trip_into_a_fresh_result(plain):
    ref = run(plain)
    buffer = io.BytesIO()
    torch.save(plain.state_dict(), buffer)
    fresh = fusers.reparameterize(model(seed=1), (X,))  # same architecture, other weights
    assert not torch.equal(run(fresh), ref)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(run(fresh), ref)


def test_to_float64_and_to_cpu(plain):
    ref = run(plain)
    assert plain.to("cpu") is plain and torch.equal(run(plain), ref)
    wide = copy.deepcopy(plain).to(dtype=torch.float64)
    tensors = list(wide.parameters()) + list(wide.buffers())
    assert all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())
    out = run(wide, X.double())
    assert out.dtype == torch.float64 and max_rel_error(out, ref) <= 1e-5


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")),
                    reason="torch.compile (inductor on CPU) needs a C compiler; none found (cc, gcc)")
def test_torch_compile_gives_the_same_outputs():
    small = zoo.randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                                  nn.Conv2d(4, 2, 1))).eval()
    x = torch.randn(1, 3, 8, 8)
    plain = fusers.reparameterize(small, (x,))
    compiled = torch.compile(plain)
    torch.testing.assert_close(run(compiled, x), run(plain, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(compiled, x), run(small, x), rtol=1e-5, atol=1e-6)
