"""Graph capture, the pass manager and the rewrite passes of the reparameterization compiler."""

from __future__ import annotations

from .capture import CaptureError, InputError, capture
from .manager import Pass, PassManager, Report
from .reparam import DEFAULT_PASSES, last_report, reparameterize

__all__ = ["capture", "reparameterize", "last_report", "DEFAULT_PASSES", "CaptureError", "InputError",
           "Pass", "PassManager", "Report"]
