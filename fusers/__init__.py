"""Graph capture, the pass manager and the rewrite passes of the reparameterization compiler.

A pass speaks the rule API of ``fusers.rules``: ``match(gm, node) -> Match | Refusal | None``,
then ``rewrite(gm, match) -> str``; a :class:`Refusal` carries a :class:`RefusalCode`.
"""

from __future__ import annotations

from .batch import free_batch
from .capture import BatchNormStatisticsError, CaptureError, InputError, capture
from .leftovers import Leftover, find_leftovers
from .manager import Instrument, PassManager, PassRecord, Report
from .reparam import DEFAULT_PASSES, last_report, reparameterize
from .rules import Match, Pass, Refusal, RefusalCode

__all__ = ["capture", "reparameterize", "last_report", "DEFAULT_PASSES", "CaptureError", "InputError",
           "BatchNormStatisticsError", "Pass", "Match", "Refusal", "RefusalCode", "Instrument", "PassManager",
           "PassRecord", "Report", "Leftover", "find_leftovers", "free_batch"]
