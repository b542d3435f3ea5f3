"""The pass manager keeps exact rewrites and rolls back inexact ones, with the reason; instruments
see every pass; refusals that stand are counted once, with their codes."""

import re

import torch
from torch import nn

import fusers
from deploy import zoo
from deploy.zoo.repvgg import RepVGGBlock
from fusers.graph import op_counts
from fusers.manager import PassManager
from fusers.rules import RefusalCode
from helpers import ScaleWeights, randomize_bn


def test_inexact_rewrite_is_rolled_back_and_exact_one_kept():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(1, 3, 10, 10)
    deploy = fusers.reparameterize(model, (x,), passes=[ScaleWeights({"conv2d": 1.0, "conv2d_1": 1.001})])
    report = deploy.reparam_report
    (record,) = [p for p in report.passes if p.name == "scale_weights" and p.round == 1]
    assert len(record.rewrites) == 1 and record.rewrites[0].endswith("x1.0")
    assert len(record.rolled_back) == 1 and record.rolled_back[0].code is RefusalCode.ROLLED_BACK
    assert record.rolled_back[0].reason.startswith("rolled back: float64 error")
    assert report.float64_error == 0.0
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model(x), rtol=0, atol=0)
    # the rolled-back site still stands at the end, once, although every round retried it
    (standing,) = report.refusals()
    assert standing.code is RefusalCode.ROLLED_BACK and standing.nodes == record.rolled_back[0].nodes


def _counting_checks(monkeypatch) -> list[int]:
    """Count the float64 forward passes of the checks (``PassManager._error``), per call."""
    calls = []
    real = PassManager._error

    def counted(self, gm):
        calls.append(1)
        return real(self, gm)

    monkeypatch.setattr(PassManager, "_error", counted)
    return calls


def test_a_round_of_exact_passes_is_proven_by_one_check(monkeypatch):
    calls = _counting_checks(monkeypatch)
    # merge_linear merges the block's branches with their BatchNorms, fold_bn folds the BatchNorm after
    model = randomize_bn(nn.Sequential(RepVGGBlock(4, 4), nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)))
    x = torch.randn(1, 4, 12, 12)
    deploy = fusers.reparameterize(model, (x,))
    report = deploy.reparam_report
    first = [p for p in report.passes if p.round == 1 and p.rewrites]
    assert {p.name for p in first} >= {"fold_bn", "merge_linear"}
    assert len(calls) == 1  # one forward pass for the round, not one per pass; the second round rewrote nothing
    assert len({p.max_rel_error for p in first}) == 1 and report.float64_error <= 1e-9
    assert op_counts(deploy).get("batch_norm", 0) == 0 and op_counts(deploy)["conv2d"] == 2


def test_a_round_that_misses_is_redone_a_pass_at_a_time(monkeypatch):
    calls = _counting_checks(monkeypatch)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(1, 3, 10, 10)
    passes = [ScaleWeights({"conv2d": 1.0, "conv2d_1": 1.001}), "fold_bn"]
    deploy = fusers.reparameterize(model, (x,), passes=passes)
    report = deploy.reparam_report
    scale, fold = [p for p in report.passes if p.round == 1]
    assert len(scale.rewrites) == 1 and scale.rewrites[0].endswith("x1.0")  # the exact site of the pass is kept
    assert [r.code for r in scale.rolled_back] == [RefusalCode.ROLLED_BACK]
    assert len(fold.rewrites) == 1 and op_counts(deploy).get("batch_norm", 0) == 0  # the exact pass after it too
    assert len(calls) > 1 and report.float64_error <= 1e-9
    with torch.no_grad():
        assert fusers.numerics.max_rel_error(model(x), deploy(x)) < 1e-5


def test_unknown_pass_name_is_a_clear_error():
    try:
        fusers.reparameterize(nn.Conv2d(1, 1, 1), (torch.randn(1, 1, 2, 2),), passes=["fold_bnn"])
    except ValueError as e:
        assert "unknown pass 'fold_bnn'" in str(e) and "fold_bn" in str(e)
    else:
        raise AssertionError("no error")


class Recorder:
    """An instrument: what the manager told it, in order."""

    def __init__(self):
        self.events = []

    def on_pass_start(self, name, round):
        self.events.append(("start", name, round))

    def on_pass_end(self, record):
        self.events.append(("end", record))

    def on_run_end(self, report):
        self.events.append(("run_end", report))


class EndOnly:
    """An instrument with one of the optional methods."""

    def __init__(self):
        self.reports = []

    def on_run_end(self, report):
        self.reports.append(report)


def test_instruments_see_every_pass_record_and_the_final_report():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    recorder, end_only = Recorder(), EndOnly()
    deploy = fusers.reparameterize(model, (torch.randn(1, 3, 8, 8),), instruments=[recorder, end_only])
    report = deploy.reparam_report
    starts = [e[1:] for e in recorder.events if e[0] == "start"]
    ends = [e[1] for e in recorder.events if e[0] == "end"]
    assert starts == [(p.name, p.round) for p in report.passes]
    assert ends == report.passes  # the same records, zero-rewrite ones included
    assert any(not p.rewrites for p in ends) and report.count("fold_bn") == 1
    assert [e[0] for e in recorder.events[:2]] == ["start", "end"]  # each start is followed by its end
    assert recorder.events[-1] == ("run_end", report) and end_only.reports == [report]
    assert report.float32_error is not None  # the report is complete when on_run_end sees it


def _summary_counts(summary: str) -> tuple[int, list[str]]:
    (total,) = re.findall(r"^total: \d+ rewrites, (\d+) refused", summary, re.M)
    return int(total), [ln for ln in summary.splitlines() if ln.startswith("  refused ")]


def test_repvgg_refusal_counts_agree_and_merged_identity_bns_are_not_refusals():
    model = zoo.randomize_batchnorm(zoo.create("repvgg_a0", width=0.0625)).eval()
    deploy = fusers.reparameterize(model, (torch.randn(1, 3, 32, 32),), passes=["fold_bn", "merge_linear"])
    report = deploy.reparam_report
    # fold_bn refused the identity-branch BatchNorms in round 1; merge_linear merged them after (by default
    # merge_linear runs first and takes the branches' BatchNorms itself)
    (first,) = [p for p in report.passes if p.name == "fold_bn" and p.round == 1]
    identity = [r for r in first.refusals if r.code is RefusalCode.NO_PRODUCER]
    assert len(identity) == 17 and all(".identity" in r.site for r in identity)
    names = {n.name for n in deploy.graph.nodes}
    assert not names & {n for r in identity for n in r.nodes}
    refusals = report.refusals()
    assert refusals == []
    total, listed = _summary_counts(report.summary())
    assert total == len(refusals) == len(listed) == report.refused() == report.to_dict()["refused"]
    assert report.to_dict()["refusals"] == []


class TwoRefusals(nn.Module):
    """A BatchNorm without running statistics, and a BN before a zero-padded conv."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3)
        self.batch = nn.BatchNorm2d(4, track_running_stats=False)
        self.pre = nn.BatchNorm2d(4)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.c1(self.pre(torch.relu(self.batch(self.c0(x)))))


def test_refusals_that_stand_are_listed_once_with_code_and_reason():
    model = randomize_bn(TwoRefusals())
    deploy = fusers.reparameterize(model, (torch.randn(2, 3, 10, 10),))
    report = deploy.reparam_report
    refusals = report.refusals()
    assert sorted((r.pass_name, r.code) for r in refusals) == [
        ("fold_bn", RefusalCode.NO_PRODUCER),       # pre: after a ReLU, before a padded conv
        ("fold_bn", RefusalCode.NO_RUNNING_STATS),  # batch
        ("fold_into_next", RefusalCode.PADDED_CONV),  # c1 reads pre through its zero padding
    ]
    rounds = max(p.round for p in report.passes)
    assert rounds >= 1 and sum(len(p.refusals) for p in report.passes) == 3 * rounds  # refused again each round
    total, listed = _summary_counts(report.summary())
    assert total == len(refusals) == len(listed) == 3
    assert all(r.reason and r.reason in ln for r, ln in zip(refusals, listed))
    (batch,) = [r for r in refusals if r.code is RefusalCode.NO_RUNNING_STATS]
    assert batch.path == "batch" and batch.site == f"batch ({batch.nodes[0]})"
    assert "running statistics" in batch.reason
    d = batch.to_dict()
    assert d["pass"] == "fold_bn" and d["code"] == "no_running_stats" and d["nodes"] == batch.nodes
    assert d["site"] == batch.site and d["reason"] == batch.reason
    assert report.to_dict()["refusals"] == [r.to_dict() for r in refusals]
