"""ExecuTorch: the target record, the runner's refusals, and the default model through ``model.pte``.

The record is read from the registry (no package needed). With ``executorch`` installed the shipped
RepVGG-Digits converts to a ``.pte`` lowered to XNNPACK, and the stage is verified against the training
model on the seeded inputs and the 360 held-out digits like every other stage.
"""

from __future__ import annotations

import pytest

from exporters import targets
from runtimes.core import CorruptArtifact, MissingDependency


def test_target_record_is_registered_and_not_in_the_default_targets():
    t = targets.get("executorch")
    assert (t.runtime, t.suffixes, t.source, t.precisions) == ("executorch", (".pte",), "torch", ("fp32",))
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


@pytest.mark.e2e
def test_default_model_converts_and_verifies_on_executorch(tmp_path):
    pytest.importorskip("executorch.runtime", reason="executorch not installed")
    from deploy.pipeline import ConvertOptions, convert

    result = convert(ConvertOptions(model="repvgg_digits", targets=("executorch",), out=str(tmp_path / "run")))
    assert result.passed
    stage = {s.name: s for s in result.stages}["executorch"]
    art, v = stage.export.artifact, stage.verification
    assert art.path.endswith("model.pte") and art.metadata["delegated_calls"] >= 1
    assert "XnnpackBackend" in art.metadata["backends"]
    assert v.max_rel <= 1e-4 and v.samples_max_rel <= 1e-4 and v.accuracy == 1.0
