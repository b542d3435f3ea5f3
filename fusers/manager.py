"""The pass manager: runs rewrite passes to a fixed point and keeps only what it proves exact.

After every pass the graph (held in float64) runs on seeded inputs and is compared with the
captured model's float64 outputs. A pass whose result differs by more than ``tolerance``
(relative to each output's scale) is undone; its rewrites are then retried one at a time so
the exact ones are kept and each inexact one is reported (:attr:`RefusalCode.ROLLED_BACK`) with
the error it caused. Instruments observe the run (see :class:`Instrument`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_map

from .capture import aliases_input
from .graph import erase_unused, is_erased, remove_unused_attributes
from .numerics import leaves as tensor_leaves
from .numerics import float64_kernels, max_rel_error
from .rules import ROLLBACK_CODES, Match, Pass, Refusal, RefusalCode

__all__ = ["Pass", "Match", "Refusal", "RefusalCode", "PassRecord", "Report", "Instrument", "PassManager"]

log = logging.getLogger(__name__)

NOISE_FACTOR = 3.0  # a result may differ from its reference by this many times the reference's own rounding noise
NOISE_SAMPLES = 3  # jittered runs that measure the noise


@dataclass
class PassRecord:
    """One pass in one round: its rewrites (``site: what``), what it refused in that round, what the
    float64 check undid, the largest error it left, and its time."""

    name: str
    round: int
    rewrites: list[str] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    rolled_back: list[Refusal] = field(default_factory=list)
    max_rel_error: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "round": self.round, "rewrites": list(self.rewrites),
                "refusals": [r.to_dict() for r in self.refusals],
                "rolled_back": [r.to_dict() for r in self.rolled_back],
                "max_rel_error": self.max_rel_error, "seconds": self.seconds}


@dataclass
class Report:
    """What reparameterization did: per pass, rewrites, refusals with reasons, measured errors.

    :meth:`refusals` is the one list of what was not done: the refusals that still stand in the
    final graph. A site refused by one pass and rewritten by a later one (an identity BatchNorm
    that ``fold_bn`` refuses and ``merge_linear`` merges) is not in it; a site refused in every
    round is listed once. Every total (:meth:`refused`, :meth:`summary`) counts that list.
    """

    passes: list[PassRecord] = field(default_factory=list)
    float64_error: float = 0.0
    float32_error: float | None = None
    proof: str = "float64"  # how rewrites were checked; see ``reparam.reparameterize``
    capture: str = ""  # how the graph was captured: "recorded" (one forward, fusers.recording) or "torch.export"
    proof_shape: list | None = None  # the smaller input shapes the per-pass checks ran at (None: the captured ones)
    tolerance_note: str = ""  # set when the graph's own float64 rounding noise raised the check's tolerance
    ops_before: dict = field(default_factory=dict)
    ops_after: dict = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    seconds: dict = field(default_factory=dict)
    standing: list[Refusal] | None = field(default=None, repr=False)  # set by ``settle`` when the passes end
    leftovers: list = field(default_factory=list)  # ``leftovers.Leftover``s: what could have merged and did not
    unused: list[str] = field(default_factory=list)  # model tensors no output depends on (capture.unused_parameters)
    dead_ops: dict = field(default_factory=dict)  # ops dropped after capture: no output depends on them

    def count(self, pass_name: str | None = None) -> int:
        """Rewrites made (by ``pass_name``, or by every pass)."""
        return sum(len(p.rewrites) for p in self.passes if pass_name in (None, p.name))

    def refusals(self) -> list[Refusal]:
        """The refusals that stand: their nodes are all still in the final graph; one per pass and site."""
        return list(self.standing) if self.standing is not None else _latest(self.passes)

    def refused(self, pass_name: str | None = None) -> int:
        """How many refusals stand (of ``pass_name``, or of every pass)."""
        return sum(1 for r in self.refusals() if pass_name in (None, r.pass_name))

    def settle(self, gm: fx.GraphModule) -> None:
        """Fix :meth:`refusals` against the final graph ``gm`` (the pass manager calls this at the end)."""
        names = {n.name for n in gm.graph.nodes}
        self.standing = [r for r in _latest(self.passes) if all(n in names for n in r.nodes)]

    def to_dict(self) -> dict[str, Any]:
        refusals = self.refusals()
        return {"passes": [p.to_dict() for p in self.passes], "refusals": [r.to_dict() for r in refusals],
                "rewrites": self.count(), "refused": len(refusals),
                "left_unfused": [left.to_dict() for left in self.leftovers],
                "float64_error": self.float64_error, "float32_error": self.float32_error, "capture": self.capture,
                "proof": self.proof,
                "proof_shape": self.proof_shape, "tolerance_note": self.tolerance_note,
                "ops_before": dict(self.ops_before), "ops_after": dict(self.ops_after),
                "params_before": self.params_before, "params_after": self.params_after, "seconds": dict(self.seconds),
                "unused": list(self.unused), "dead_ops": dict(self.dead_ops)}

    def summary(self) -> str:
        """A plain-text table for people; the refused count is the number of refusals listed under it."""
        refusals = self.refusals()
        undone = sum(r.code in ROLLBACK_CODES for r in refusals)
        rows = [f"{p.name:<18}{p.round:>6}{len(p.rewrites):>10}{len(p.rolled_back):>13}{p.max_rel_error:>14.2e}"
                for p in self.passes if p.rewrites or p.rolled_back]
        header = f"{'pass':<18}{'round':>6}{'rewrites':>10}{'rolled back':>13}{'f64 rel err':>14}"
        lines = [header, *rows] if rows else []
        lines.append(f"total: {self.count()} rewrites, {len(refusals)} refused"
                     + (f" ({undone} rolled back by the float64 check)" if undone else ""))
        for r in refusals:
            lines.append(f"  refused {r.site} [{r.pass_name}: {r.code.value}]: {r.reason}")
        if self.leftovers:
            lines.append(f"left unfused: {len(self.leftovers)}")
            lines += [f"  {left.kind} {left.site}: {left.reason}" for left in self.leftovers]
        at = f" (at {'x'.join(map(str, self.proof_shape[0]))})" if self.proof_shape else ""
        lines.append(f"float64 max rel error vs captured model: {self.float64_error:.2e}{at}" if self.proof == "float64"
                     else f"proof: {self.proof}; max rel error vs captured model: {self.float64_error:.2e}{at}")
        if self.tolerance_note:
            lines.append(self.tolerance_note)
        if self.float32_error is not None:
            lines.append(f"float32 max rel error vs training model: {self.float32_error:.2e}")
        if self.dead_ops:
            dead = ", ".join(f"{k} {v}" for k, v in self.dead_ops.items())
            lines.append(f"dropped, no output depends on them: {dead} ({len(self.unused)} model tensors unused)")
        lines.append(f"params {self.params_before:,} -> {self.params_after:,}")
        changed = sorted(set(self.ops_before) | set(self.ops_after))
        ops = ", ".join(f"{k} {self.ops_before.get(k, 0)}->{self.ops_after.get(k, 0)}" for k in changed
                        if self.ops_before.get(k, 0) != self.ops_after.get(k, 0))
        lines.append(f"ops changed: {ops or 'none'}")
        return "\n".join(lines)


def _latest(records: list[PassRecord]) -> list[Refusal]:
    """Every refusal and rollback of every round, one per pass and site: the latest judgement."""
    latest: dict[tuple, Refusal] = {}
    for p in records:
        for r in p.refusals + p.rolled_back:
            latest[r.key] = r  # a dict keeps the first position, the value is replaced
    return list(latest.values())


class Instrument:
    """Observes a :class:`PassManager`; every method is optional, these do nothing.

    Any object with some of these methods is an instrument; subclassing is not required.
    ``on_pass_end`` receives every record, also those with no rewrite; ``on_restart`` comes when
    ``reparameterize`` starts the passes again at the captured size (their records so far are dropped).
    """

    def on_pass_start(self, name: str, round: int) -> None:  # noqa: A002 - the record's field name
        pass

    def on_pass_end(self, record: PassRecord) -> None:
        pass

    def on_restart(self, reason: str) -> None:
        """The passes start again from the captured graph (``reason`` says why); what they reported so far
        is dropped from the report."""

    def on_run_end(self, report: Report) -> None:
        pass


class PassManager:
    """Runs ``passes`` in order, repeatedly, until a round makes no rewrite.

    A round first runs every pass and checks the graph once (:meth:`_run_round`): when all of them are exact,
    which is the common case, one forward pass proves the round. When that check fails, a pass crashes or the
    round's new weights outgrow ``budget_bytes``, the round is undone and run again a pass at a time, as every
    later round is, to find and undo what is inexact:

    Rewrites are applied in chunks: a chunk ends once it has added ``budget_bytes`` of new
    weights, then the graph is checked and the weights it replaced are freed. This bounds peak
    memory to about the float64 model plus one chunk, whatever the pass.

    The first time a chunk misses ``tolerance`` in float64, the graph's own rounding noise is measured
    (:meth:`_rounding_noise`: every weight and every op's result moved by one unit of rounding). An
    ill-conditioned graph (a gate saturated by activations of 1e4, say) turns those ulps into more than
    ``tolerance``: no rewrite that rounds a weight can be held closer than that, so the tolerance becomes
    :data:`NOISE_FACTOR` times the noise, the chunk is checked again, and the report says so.

    ``smaller(gm)``, when given, returns other inputs and ``gm``'s outputs on them, or ``(None, None)``: it is
    called once, when a round first has to be redone a pass at a time, and the checks from then on run on its
    inputs (smaller ones, quicker to run: ``reparameterize`` checks the result on the first inputs after).
    ``shrunk`` says whether they did.

    ``instruments`` receive ``on_pass_start(name, round)`` and ``on_pass_end(record)`` for every
    pass of every round, and ``on_run_end(report)`` from :meth:`finish`.
    """

    def __init__(self, passes: list[Pass], inputs, reference, tolerance: float = 1e-9, max_rounds: int = 8,
                 budget_bytes: int | None = None, instruments: Iterable[Any] = (),
                 smaller: Callable[[fx.GraphModule], tuple] | None = None):
        self.passes, self.inputs, self.reference = passes, inputs, reference
        self.smaller, self.shrunk = smaller, False
        self.tolerance, self.max_rounds, self.budget = tolerance, max_rounds, budget_bytes
        self.instruments = list(instruments)
        self.noise: float | None = None  # the float64 rounding noise, once measured
        self.last_error: float | None = None  # the error of the graph as it is, when it was checked as it is
        self.base_tolerance = tolerance

    def _notify(self, event: str, *args) -> None:
        for instrument in self.instruments:
            method = getattr(instrument, event, None)
            if method is not None:
                method(*args)

    def _precision(self) -> str:
        """The dtype the check runs in (float64, or the model's own where the graph cannot run in float64)."""
        leaf = next(iter(tensor_leaves(self.reference)), None)
        return "float64" if leaf is None else str(leaf.dtype).removeprefix("torch.")

    def _error(self, gm) -> float:
        gm.graph.lint()
        gm.recompile()  # the rewrites edit the graph only; its code is generated once, here, before it runs
        with torch.no_grad(), float64_kernels():
            self.last_error = max_rel_error(self.reference, gm(*self.inputs))
        return self.last_error

    def run(self, gm: fx.GraphModule, report: Report) -> None:
        """Rewrite ``gm`` in place, appending a record per pass and round; then settle the refusals."""
        if self.budget is None:
            self.budget = max(_nbytes(gm) // 4, 1 << 20)
        together = True  # rounds run together until one fails: then each pass alone, as the first of them did
        for round_ in range(1, self.max_rounds + 1):
            records = self._run_round(gm, round_) if together else None
            if records is None and together:
                self._shrink(gm)
            together = records is not None
            for record in records or []:
                self._notify("on_pass_start", record.name, round_)
                self._log(record)
                self._notify("on_pass_end", record)
            if records is None:
                records = []
                for p in self.passes:
                    self._notify("on_pass_start", p.name, round_)
                    start = time.perf_counter()
                    record = self._run_pass(p, gm, round_)
                    record.seconds = time.perf_counter() - start
                    records.append(record)
                    self._log(record)
                    self._notify("on_pass_end", record)
            report.passes += records
            if not any(record.rewrites for record in records):
                break
        gm.recompile()
        if self.tolerance > self.base_tolerance:
            report.tolerance_note = (
                f"check tolerance {self.tolerance:.1e}: {NOISE_FACTOR:g}x the captured graph's own float64 rounding "
                f"noise {self.noise:.1e} (its outputs with every weight and op result moved by one unit of rounding); "
                "no rewrite can agree more closely")
        report.settle(gm)

    def _shrink(self, gm) -> None:
        """Check on ``smaller``'s inputs from now on, where it gives any (the passes are redone one at a time:
        many checks)."""
        if self.smaller is None:
            return
        inputs, reference = self.smaller(gm)
        if inputs is not None:
            self.inputs, self.reference, self.shrunk = inputs, reference, True
            self.last_error = None

    def finish(self, report: Report) -> None:
        """Hand the completed report to the instruments (``reparameterize`` calls this last)."""
        self._notify("on_run_end", report)

    def restart(self, reason: str) -> None:
        """Tell the instruments the passes start again at the captured size (``reparameterize`` calls this)."""
        self._notify("on_restart", reason)

    def _apply(self, p: Pass, gm, matches: list[Match], budget: int | None = None
               ) -> tuple[list[tuple[Match, str]], list[Match]]:
        """Rewrite the sites in order, each matched again first, stopping past ``budget`` new bytes.

        Returns the rewrites made (match, description) and the matches not reached.
        """
        self.last_error = None  # the graph changes: its error is not known until it is checked again
        by_name = {n.name: n for n in gm.graph.nodes}
        base, done, rest = _new_bytes(gm) if budget is not None else 0, [], []
        for i, m in enumerate(matches):
            node = by_name.get(m.nodes[0])
            fresh = p.match(gm, node) if node is not None and not is_erased(node) else None
            if isinstance(fresh, Match):
                done.append((m, p.rewrite(gm, fresh)))
            else:
                log.debug("%s: %s skipped, the site changed", p.name, m.site)
            if budget is not None and _new_bytes(gm) - base > budget:
                rest = matches[i + 1:]
                break
        return done, rest

    @staticmethod
    def _log(record: PassRecord) -> None:
        log.info("%s (round %d): %d rewrites, %d refused, %d rolled back, error %.1e", record.name, record.round,
                 len(record.rewrites), len(record.refusals), len(record.rolled_back), record.max_rel_error)

    def _run_round(self, gm, round_: int) -> list[PassRecord] | None:
        """Every pass once, in order, then one check of the graph they leave: the records of the round, or
        ``None`` with the graph as it was when the check fails, a pass crashes or the round's new weights
        outgrow the budget, for :meth:`_run_pass` to redo the round a pass and a chunk at a time and find what
        to undo.

        Every rewrite is still checked before it is kept; the forward passes of the check are shared by the
        passes of a round, which is most of the time when all of them are exact. Each record's
        ``max_rel_error`` is then the error of the round's graph."""
        saved, base = None, _new_bytes(gm)  # the graph is copied before the first rewrite of the round
        held = set(gm._parameters) | set(gm._buffers)  # what the saved graph may read
        budget = max(self.budget, 2 * _nbytes(gm))  # new weights up to twice the weights' bytes, else chunks
        records, done_any = [], False
        try:
            for p in self.passes:
                start = time.perf_counter()
                record = PassRecord(p.name, round_)
                pending = _matches(p, gm, record)
                if pending and saved is None:
                    saved = copy.deepcopy(gm.graph)
                done, rest = self._apply(p, gm, pending, budget - (_new_bytes(gm) - base)) if pending else ([], [])
                if done:
                    _free_replaced(gm, held)
                if rest or _new_bytes(gm) - base > budget:
                    self._restore(gm, saved)
                    return None
                record.rewrites = [f"{m.site}: {what}" for m, what in done]
                record.seconds = time.perf_counter() - start
                records.append(record)
                done_any |= bool(done)
            err = self._error(gm) if done_any else 0.0
        except Exception as e:  # noqa: BLE001 - a crashing pass is found and reported by the per-pass run
            log.debug("a pass of round %d crashed (%s); the round again a pass at a time", round_, e)
            if saved is not None:
                self._restore(gm, saved)
            return None
        if err > self.tolerance:
            log.debug("round %d together: error %.1e; again a pass at a time", round_, err)
            self._restore(gm, saved)
            return None
        for record in records:
            record.max_rel_error = err if record.rewrites else 0.0
        remove_unused_attributes(gm, recompile=False)
        return records

    def _run_pass(self, p: Pass, gm, round_: int) -> PassRecord:
        """Apply every site the pass matches once, a chunk at a time, each chunk checked."""
        record = PassRecord(p.name, round_)
        pending = _matches(p, gm, record)
        while pending:
            saved = copy.deepcopy(gm.graph)
            try:
                done, rest = self._apply(p, gm, pending, self.budget)
                err = self._error(gm)
            except Exception as e:  # a crashing rewrite is a bug: undo it, say so, keep going
                log.warning("pass %s crashed (%s: %s); its rewrites were undone", p.name, type(e).__name__, e)
                log.debug("traceback of the crash", exc_info=True)
                self._restore(gm, saved)
                record.rolled_back.append(Refusal(p.name, RefusalCode.CRASHED, [],
                                                  f"pass crashed: {type(e).__name__}: {e}"))
                return record
            if err > self.tolerance and self.noise is None and self._precision() == "float64":
                self._restore(gm, saved)  # the noise is the graph's own, measured without the chunk
                if self._raise_tolerance(gm):
                    continue  # the same chunk again, against the tolerance the graph's noise allows
            if err <= self.tolerance:
                record.rewrites += [f"{m.site}: {what}" for m, what in done]
                record.max_rel_error = max(record.max_rel_error, err)
            else:
                self._restore(gm, saved)
                self._bisect(p, gm, record, [m for m, _ in done], saved)
            pending = rest
            remove_unused_attributes(gm, recompile=False)  # weights replaced by an accepted chunk are freed now
        return record

    def _bisect(self, p: Pass, gm, record: PassRecord, matches: list[Match], saved) -> None:
        """Retry each rewrite of a failed chunk alone; keep the exact ones, report the others."""
        good = []
        for m in matches:
            self._apply(p, gm, [m])
            err = self._error(gm)
            self._restore(gm, saved)
            if err <= self.tolerance:
                good.append(m)
            else:
                record.rolled_back.append(Refusal(p.name, RefusalCode.ROLLED_BACK, m.nodes,
                                                  f"rolled back: {self._precision()} error {err:.1e} > "
                                                  f"{self.tolerance:.0e}",
                                                  m.path))
        if not good:
            return
        done, _ = self._apply(p, gm, good)
        err = self._error(gm)
        if err > self.tolerance:  # exact alone, inexact together: keep none of them
            self._restore(gm, saved)
            record.rolled_back.append(Refusal(p.name, RefusalCode.REWRITES_INTERACT, [n for m in good for n in m.nodes],
                                              f"rewrites interact: error {err:.1e}"))
            return
        record.rewrites += [f"{m.site}: {what}" for m, what in done]
        record.max_rel_error = max(record.max_rel_error, err)

    def _raise_tolerance(self, gm) -> bool:
        """Measure the graph's rounding noise once; whether it raised the tolerance."""
        self.noise = self._rounding_noise(gm)
        log.info("float64 rounding noise of the graph: %.1e", self.noise)
        if NOISE_FACTOR * self.noise <= self.tolerance:
            return False
        self.tolerance = NOISE_FACTOR * self.noise
        log.warning("rewrites are checked to %.1e: the graph's own float64 rounding noise is %.1e", self.tolerance,
                    self.noise)
        return True

    def _rounding_noise(self, gm) -> float:
        """The error, against the reference, of ``gm`` run with every floating weight and every op's floating
        result moved by one unit of rounding up or down (seeded): what a float64 run with its roundings made
        in another, equally valid way gives; the largest of :data:`NOISE_SAMPLES` such runs (one set of signs
        alone can cancel out: on one ill-conditioned graph they ranged over 9.5e-10 to 3.2e-8). Views and
        in-place results are not moved (their storage is shared)."""
        with torch.no_grad(), float64_kernels():
            return max(max_rel_error(self.reference, _Jitter(gm, seed).run(*self.inputs))
                       for seed in range(NOISE_SAMPLES))

    def _restore(self, gm, saved) -> None:
        gm.graph = copy.deepcopy(saved)  # the setter recompiles
        self.last_error = None


class _Jitter(fx.Interpreter):
    """Runs a graph with each result moved by one unit of rounding, ``t * (1 ± eps)`` per element (seeded)."""

    def __init__(self, gm, seed: int = 0):
        super().__init__(gm)
        self.generator = torch.Generator().manual_seed(seed)

    def run_node(self, node):
        out = super().run_node(node)
        if node.op in ("get_attr", "call_function") and not aliases_input(node):
            out = tree_map(self._move, out)
        return out

    def _move(self, t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        sign = torch.randint(0, 2, t.shape, generator=self.generator).to(t.dtype) * 2 - 1
        return t * (1 + torch.finfo(t.dtype).eps * sign)


def _matches(p: Pass, gm, record: PassRecord) -> list[Match]:
    """The sites ``p`` matches in ``gm``, its refusals appended to ``record``."""
    pending = []
    for found in p.matches(gm):
        if isinstance(found, Match):
            found.plan = None  # matched again before its rewrite: holding every plan would hold every new kernel
            pending.append(found)
        else:
            record.refusals.append(found)
    return pending


def _free_replaced(gm, held: set[str]) -> None:
    """Free the tensors that passes of a round added to ``gm`` and later passes of it already replaced: neither
    the graph nor the copy a failed check restores (which reads only ``held``) reads them."""
    erase_unused(gm.graph, [n for n in gm.graph.nodes if n.op == "get_attr"])
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for store in (gm._parameters, gm._buffers):
        for name in [k for k in store if k not in held and k not in read]:
            del store[name]


def _nbytes(gm) -> int:
    return sum(t.numel() * t.element_size() for t in list(gm.parameters()) + list(gm.buffers()))


def _new_bytes(gm) -> int:
    """The bytes of the tensors held on ``gm`` itself, where rewrites put their new weights
    (:func:`fusers.graph.add_tensor`): cheap enough to read after every rewrite."""
    tensors = list(gm._parameters.values()) + list(gm._buffers.values())
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
