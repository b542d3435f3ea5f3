"""The rule API every pass speaks: ``match`` a node, then ``rewrite`` the match.

A pass is a small object with a ``name``:

* ``match(gm, node) -> Match | Refusal | None``: ``None`` when the pattern is not here, a
  :class:`Refusal` when it is here but the rewrite cannot be proven exact (with a
  :class:`RefusalCode` and the human sentence), a :class:`Match` holding the plan otherwise;
* ``rewrite(gm, match) -> str``: carry the plan out and say in a few words what changed.

The pass manager calls ``matches(gm)`` once per pass and round (by default ``match`` on every
node; a pass that needs a whole-graph view overrides it), then matches each site *again* right
before rewriting it, since earlier rewrites of the same pass may have moved its inputs. Matches
and refusals name nodes, never hold them: the manager restores graphs from copies.

An *instrument* observes the manager (``fusers.manager.Instrument``); it is defined beside the
records it receives, so this module imports nothing of the manager.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import fx

from .graph import common_path

__all__ = ["RefusalCode", "Refusal", "Match", "Pass", "ROLLBACK_CODES"]


class RefusalCode(str, enum.Enum):
    """Why a pass did not rewrite a site; one member per distinct reason. The value is stable text."""

    # the graph around the site
    OTHER_USERS = "other_users"                    # an intermediate result is also used elsewhere
    NO_PRODUCER = "no_producer"                    # a BatchNorm after no conv/Linear (kept as an affine op)
    LINEAR_NOT_2D = "linear_not_2d"                # BatchNorm after a Linear with a non-2-D output
    # BatchNorm
    NO_RUNNING_STATS = "no_running_stats"          # batch statistics (train mode, track_running_stats=False)
    # padding
    PADDED_CONV = "padded_conv"                    # a conv zero-pads what an affine shift would move
    ZERO_PAD_WITH_BIAS = "zero_pad_with_bias"      # a kxk op zero-pads a 1x1 conv output with a bias
    PAD_VALUE_MISMATCH = "pad_value_mismatch"      # an explicit pad value differs from the 1x1 conv's bias
    # data movement
    MIXES_CHANNELS = "mixes_channels"              # data movement that mixes channels
    # branch sums and sequences
    STRIDE_MISMATCH = "stride_mismatch"            # branches with different strides
    CHANNEL_MISMATCH = "channel_mismatch"          # channel counts that do not line up
    OUTPUT_SIZE_MISMATCH = "output_size_mismatch"  # a branch's output size differs from the merged conv's
    OFF_DILATION_GRID = "off_dilation_grid"        # a branch's taps miss the merged dilation grid
    GROUPS_INCOMPATIBLE = "groups_incompatible"    # groups that cannot be expressed together
    NOT_POINTWISE = "not_pointwise"                # the first conv of a sequence is not 1x1/stride 1/unpadded
    NONLINEAR_BRANCH = "nonlinear_branch"          # a branch that is not linear in the shared input
    WOULD_GROW = "would_grow"                      # the merged form would hold more weights
    # the RM operation
    NOT_NONNEGATIVE = "not_nonnegative"            # a block input that may be negative
    OUT_OF_RANGE = "out_of_range"                  # a block input that may leave an activation's fixed range
    GROUPED_CONV = "grouped_conv"                  # carrying the input through a grouped conv
    NO_DIRAC_TAP = "no_dirac_tap"                  # no kernel tap reads input offset 0
    SHORTCUT_SHAPE = "shortcut_shape"              # the shortcut conv is not a 1x1 with the block's stride
    STRIDED_IDENTITY = "strided_identity"          # an identity shortcut around a strided chain
    # in-place writes
    WRITES_VISIBLE = "writes_visible"              # an in-place write into an input, a weight or a view of another tensor
    UNSUPPORTED_WRITE = "unsupported_write"        # a write through non-slice views, across a read, or with a cast
    # quantization-friendly rescaling
    NOT_HOMOGENEOUS = "not_homogeneous"            # an activation with act(x / s) != act(x) / s between two convs
    # legalization
    NON_INTEGER_EXPONENT = "non_integer_exponent"  # a power with no exact product form
    # the manager's proof
    ROLLED_BACK = "rolled_back"                    # a rewrite undone by the float64 check
    REWRITES_INTERACT = "rewrites_interact"        # rewrites exact alone, inexact together: all undone
    CRASHED = "crashed"                            # a rewrite raised: the pass's chunk undone


ROLLBACK_CODES = frozenset({RefusalCode.ROLLED_BACK, RefusalCode.REWRITES_INTERACT, RefusalCode.CRASHED})


def _site(path: str, nodes: list[str], fallback: str) -> str:
    names = ", ".join(nodes) or fallback
    return f"{path} ({names})" if path else names


@dataclass
class Refusal:
    """A site a pass did not rewrite, and why (``code`` for programs, ``message`` for people)."""

    pass_name: str
    code: RefusalCode
    nodes: list[str]
    message: str
    path: str = ""  # the module the nodes came from ('' when unknown)

    @property
    def site(self) -> str:
        """``module.path (node, ...)``: where it is, for people."""
        return _site(self.path, self.nodes, self.pass_name)

    @property
    def reason(self) -> str:
        return self.message

    @property
    def key(self) -> tuple:
        """What makes two refusals (of different rounds) one: the same pass on the same nodes."""
        return self.pass_name, tuple(self.nodes)

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_name, "code": self.code.value, "nodes": list(self.nodes), "path": self.path,
                "site": self.site, "reason": self.message}


@dataclass
class Match:
    """A site a pass will rewrite: the nodes that name it (the first one anchors it) and the plan."""

    pass_name: str
    nodes: list[str]
    plan: Any = None
    path: str = ""

    @property
    def site(self) -> str:
        return _site(self.path, self.nodes, self.pass_name)


class Pass:
    """A named rewrite rule: ``match`` a node, ``rewrite`` a match (see the module docstring).

    ``refusal`` prefixes the messages of :meth:`refuse` (e.g. "BatchNorm not folded").
    """

    name = "pass"
    refusal = ""

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Refusal | None:
        raise NotImplementedError

    def matches(self, gm: fx.GraphModule) -> Iterator[Match | Refusal]:
        """Every match and refusal in the graph; by default ``match`` on each node in order."""
        for node in list(gm.graph.nodes):
            found = self.match(gm, node)
            if found is not None:
                yield found

    def rewrite(self, gm: fx.GraphModule, match: Match) -> str:
        raise NotImplementedError

    def found(self, nodes: list[fx.Node], plan: Any = None) -> Match:
        """A :class:`Match` named by ``nodes`` (the first anchors it) carrying ``plan``."""
        return Match(self.name, [n.name for n in nodes], plan, common_path(nodes))

    def refuse(self, code: RefusalCode, nodes: list[fx.Node], why: str) -> Refusal:
        """A :class:`Refusal` of ``nodes`` with the sentence ``why`` (after this pass's prefix)."""
        message = f"{self.refusal}: {why}" if self.refusal else why
        return Refusal(self.name, code, [n.name for n in nodes], message, common_path(nodes))
