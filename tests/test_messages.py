"""Small messages a newcomer meets: a run directory that does not exist, an option typo, default run folders
that two sources would share."""

from __future__ import annotations

import pytest
from conftest import error_line, main_in_process

from deploy.pipeline import default_name


def test_bench_of_a_missing_directory_says_it_does_not_exist(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in ("runs/nonexistent", "best.pt", "net.py:build"):
        rc, out, err = main_in_process(capsys, "bench", missing)
        line = error_line(err)
        assert rc == 2 and "does not exist: pass a run directory that deploy convert wrote" in line, line
        assert "converting it first" not in out + err and "unknown model" not in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, command, typo, meant", [
    (["--precison", "fp16"], "convert", "--precison", "--precision"),
    (["convert", "--targts", "onnx"], "convert", "--targts", "--targets"),
    (["bench", "--wramup-iters", "3"], "bench", "--wramup-iters", "--warmup-iters"),
])
def test_an_option_typo_names_the_command_and_the_closest_option(capsys, argv, command, typo, meant):
    rc, _, err = main_in_process(capsys, *argv)
    assert rc == 2 and f"deploy {command}: error: unrecognized argument: {typo} (did you mean {meant}?)" in err
    assert f"usage: deploy {command}" in err  # that command's usage, not the top-level one


def test_an_unknown_word_gets_no_far_fetched_suggestion(capsys):
    rc, _, err = main_in_process(capsys, "zoo", "--bogus")
    assert rc == 2 and "unrecognized argument: --bogus" in err and "did you mean" not in err


def test_timm_and_torchvision_models_get_their_own_default_folder():
    assert default_name("repvgg_a0") == "repvgg_a0"
    assert default_name("timm:repvgg_a0") == "timm_repvgg_a0"
    assert default_name("torchvision:resnet18") == "torchvision_resnet18"
    assert default_name("models/net.py:build") == "net_build"


def test_an_internal_error_is_one_sentence_and_its_traceback_needs_verbose(capsys, monkeypatch):
    from deploy import cli

    def broken(args):
        raise RuntimeError("Tensor dtype mismatch! Expected: Float, Got: double\nsecond line")

    monkeypatch.setattr(cli, "cmd_zoo", broken)
    rc, out, err = main_in_process(capsys, "zoo")
    assert rc == 1 and "Traceback" not in err
    assert error_line(err) == ("deploy zoo: error: internal error (RuntimeError: Tensor dtype mismatch! Expected: "
                               "Float, Got: double); run again with -v for the traceback and report it.")
    rc, out, err = main_in_process(capsys, "zoo", "-v")
    assert rc == 1 and "Traceback" in err and "second line" in err
