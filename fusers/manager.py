"""The pass manager: runs rewrite passes to a fixed point and keeps only what it proves exact.

After every pass the graph (held in float64) runs on seeded inputs and is compared with the
captured model's float64 outputs. A pass whose result differs by more than ``tolerance``
(relative to each output's scale) is undone; its rewrites are then retried one at a time so
the exact ones are kept and each inexact one is reported with the error it caused.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import fx

from .graph import remove_unused_attributes, site
from .numerics import max_rel_error

__all__ = ["Pass", "NodePass", "Site", "Refusal", "PassRecord", "Report", "PassManager"]

log = logging.getLogger(__name__)


@dataclass
class Refusal:
    site: str
    reason: str


@dataclass
class Site:
    """One rewrite a pass can make: ``apply(gm)`` performs it and returns a short description."""

    name: str
    apply: object  # Callable[[fx.GraphModule], str]


class Pass:
    """A named rewrite. ``find`` returns the sites it would rewrite and the ones it refuses."""

    name = "pass"

    def find(self, gm: fx.GraphModule) -> tuple[list[Site], list[Refusal]]:
        raise NotImplementedError


class NodePass(Pass):
    """A pass that judges each node on its own.

    ``analyze(gm, node)`` returns None (no pattern here), ``(None, reason)`` (a pattern it refuses)
    or a plan; ``rewrite(gm, node, plan)`` carries a plan out and describes it. The plan is made
    again when the rewrite runs, since earlier rewrites of the same pass may have moved its inputs.
    """

    refusal = "not rewritten"

    def analyze(self, gm: fx.GraphModule, node: fx.Node):
        raise NotImplementedError

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, plan) -> str:
        raise NotImplementedError

    def find(self, gm):
        sites, refusals = [], []
        for node in gm.graph.nodes:
            plan = self.analyze(gm, node)
            if plan is None:
                continue
            if plan[0] is None:
                refusals.append(Refusal(site([node]), f"{self.refusal}: {plan[1]}"))
            else:
                sites.append(Site(site([node]), lambda gm, node=node: self._rewrite_again(gm, node)))
        return sites, refusals

    def _rewrite_again(self, gm, node) -> str:
        plan = self.analyze(gm, node)
        if plan is None or plan[0] is None:
            return "skipped: the site changed"
        return self.rewrite(gm, node, plan)


@dataclass
class PassRecord:
    name: str
    round: int
    rewrites: list[str] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    rolled_back: list[Refusal] = field(default_factory=list)
    max_rel_error: float = 0.0
    seconds: float = 0.0


@dataclass
class Report:
    """What reparameterization did: per pass, rewrites, refusals with reasons, measured errors."""

    passes: list[PassRecord] = field(default_factory=list)
    float64_error: float = 0.0
    float32_error: float | None = None
    ops_before: dict = field(default_factory=dict)
    ops_after: dict = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    seconds: dict = field(default_factory=dict)

    def count(self, pass_name: str | None = None) -> int:
        return sum(len(p.rewrites) for p in self.passes if pass_name in (None, p.name))

    def refusals(self) -> list[Refusal]:
        """Why rewrites did not happen in the final graph: each pass's last refusals, and every rollback."""
        last = {p.name: p for p in self.passes}
        found = [r for p in last.values() for r in p.refusals] + [r for p in self.passes for r in p.rolled_back]
        seen, out = set(), []
        for r in found:
            if (r.site, r.reason) not in seen:
                seen.add((r.site, r.reason))
                out.append(r)
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """A plain-text table for people."""
        lines = [f"{'pass':<18}{'round':>6}{'rewrites':>10}{'refused':>9}{'rolled back':>13}{'f64 rel err':>14}"]
        for p in self.passes:
            if p.rewrites or p.refusals or p.rolled_back:
                lines.append(f"{p.name:<18}{p.round:>6}{len(p.rewrites):>10}{len(p.refusals):>9}"
                             f"{len(p.rolled_back):>13}{p.max_rel_error:>14.2e}")
        for r in self.refusals():
            lines.append(f"  refused {r.site}: {r.reason}")
        lines.append(f"float64 max rel error vs captured model: {self.float64_error:.2e}")
        if self.float32_error is not None:
            lines.append(f"float32 max rel error vs training model: {self.float32_error:.2e}")
        lines.append(f"params {self.params_before:,} -> {self.params_after:,}")
        changed = sorted(set(self.ops_before) | set(self.ops_after))
        ops = ", ".join(f"{k} {self.ops_before.get(k, 0)}->{self.ops_after.get(k, 0)}" for k in changed
                        if self.ops_before.get(k, 0) != self.ops_after.get(k, 0))
        lines.append(f"ops changed: {ops or 'none'}")
        return "\n".join(lines)


class PassManager:
    """Runs ``passes`` in order, repeatedly, until a round makes no rewrite.

    Rewrites are applied in chunks: a chunk ends once it has added ``budget_bytes`` of new
    weights, then the graph is checked and the weights it replaced are freed. This bounds peak
    memory to about the float64 model plus one chunk, whatever the pass.
    """

    def __init__(self, passes: list[Pass], inputs, reference, tolerance: float = 1e-9, max_rounds: int = 8,
                 budget_bytes: int | None = None):
        self.passes, self.inputs, self.reference = passes, inputs, reference
        self.tolerance, self.max_rounds, self.budget = tolerance, max_rounds, budget_bytes

    def _error(self, gm) -> float:
        with torch.no_grad():
            return max_rel_error(self.reference, gm(*self.inputs))

    def run(self, gm: fx.GraphModule, report: Report) -> None:
        if self.budget is None:
            self.budget = max(_nbytes(gm) // 4, 1 << 20)
        for round_ in range(1, self.max_rounds + 1):
            changed = False
            for p in self.passes:
                start = time.perf_counter()
                record = self._run_pass(p, gm, round_)
                record.seconds = time.perf_counter() - start
                report.passes.append(record)
                changed |= bool(record.rewrites)
                log.info("%s (round %d): %d rewrites, %d refused, %d rolled back, error %.1e", p.name, round_,
                         len(record.rewrites), len(record.refusals), len(record.rolled_back), record.max_rel_error)
            if not changed:
                return

    def _apply(self, p: Pass, gm, names: list[str], sites: dict | None = None,
               budget: int | None = None) -> list[tuple[str, str]]:
        """Apply the named sites in order (found anew unless ``sites`` is current), stopping past ``budget`` bytes."""
        if sites is None:
            sites = {s.name: s for s in p.find(gm)[0]}
        base, done = _nbytes(gm), []
        for name in names:
            if name in sites:
                done.append((name, sites[name].apply(gm)))
            if budget is not None and _nbytes(gm) - base > budget:
                break
        gm.graph.lint()
        gm.recompile()
        return done

    def _run_pass(self, p: Pass, gm, round_: int) -> PassRecord:
        """Apply every site the pass finds once, a chunk at a time, each chunk checked."""
        record = PassRecord(p.name, round_)
        found, record.refusals = p.find(gm)
        sites = {s.name: s for s in found}
        pending = list(sites)
        while pending:
            saved = copy.deepcopy(gm.graph)
            try:
                done = self._apply(p, gm, pending, sites, self.budget)
                err = self._error(gm)
            except Exception as e:  # a crashing rewrite is a bug: undo it, say so, keep going
                log.exception("pass %s crashed; its rewrites were undone", p.name)
                self._restore(gm, saved)
                record.rolled_back.append(Refusal(p.name, f"pass crashed: {type(e).__name__}: {e}"))
                return record
            names = [name for name, _ in done]
            pending = [n for n in pending if n not in names and n in sites] if done else []
            if err <= self.tolerance:
                record.rewrites += [f"{name}: {what}" for name, what in done]
                record.max_rel_error = max(record.max_rel_error, err)
            else:
                self._restore(gm, saved)
                self._bisect(p, gm, record, names, saved)
                sites = {s.name: s for s in p.find(gm)[0]}  # the restored graph has new node objects
            remove_unused_attributes(gm)  # weights replaced by an accepted chunk are freed now
        return record

    def _bisect(self, p: Pass, gm, record: PassRecord, names: list[str], saved) -> None:
        """Retry each rewrite of a failed chunk alone; keep the exact ones, report the others."""
        good = []
        for name in names:
            self._apply(p, gm, [name])
            err = self._error(gm)
            self._restore(gm, saved)
            if err <= self.tolerance:
                good.append(name)
            else:
                record.rolled_back.append(Refusal(name, f"rolled back: float64 error {err:.1e} > {self.tolerance:.0e}"))
        if not good:
            return
        done = self._apply(p, gm, good)
        err = self._error(gm)
        if err > self.tolerance:  # exact alone, inexact together: keep none of them
            self._restore(gm, saved)
            record.rolled_back.append(Refusal(p.name, f"rewrites interact: error {err:.1e}"))
            return
        record.rewrites += [f"{n}: {what}" for n, what in done]
        record.max_rel_error = max(record.max_rel_error, err)

    @staticmethod
    def _restore(gm, saved) -> None:
        gm.graph = copy.deepcopy(saved)
        gm.recompile()


def _nbytes(gm) -> int:
    return sum(t.numel() * t.element_size() for t in list(gm.parameters()) + list(gm.buffers()))
