"""What every INT8 quantizer takes: calibration inputs and the quantization choices (:class:`Int8Options`).

A target that can make INT8 declares ``quantize`` in its record (``exporters.targets.Target``): a
``"module:function"`` called as ``function(fp32_artifact, path, options) -> Artifact`` that writes an
int8 artifact (precision ``"int8"``) at ``path`` from the target's verified fp32 artifact, through the
library made for that format (ONNX Runtime's static quantizer, NNCF, litert-torch's PT2E quantizer).

Layers are named by the plain model's graph node names (``"conv2d_3"``): the ONNX exporter names the
node ``node_conv2d_3`` and its output ``conv2d_3``; each quantizer maps those names onto its format,
so the blame table, ``exclude`` and ``--int8-fallback`` speak of the same layers on every target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Int8Options", "METHODS", "check_calibration"]

METHODS = ("minmax", "entropy", "percentile")


@dataclass
class Int8Options:
    """Calibration data and choices for one INT8 quantization.

    ``calibration``: ``(N, ...)`` float32 inputs of the model's single input, never the evaluation
    samples; ``method``: how activation ranges are read from them (``minmax``, ``entropy`` or
    ``percentile``, the last at ``percentile``); ``per_channel``: one weight scale per output channel
    (else one per tensor); ``exclude``: layers (graph node names) kept in float, each one the format must have;
    ``float_scope``: ops kept in float by rule (a detector's decode, ``deploy.int8.decode_scope``): a quantizer
    keeps those its format has and passes over the others (a view the format folds away); ``bias_correction``:
    ``{layer: per-channel array}`` subtracted from those layers' biases before quantizing
    (``exporters.bias_correction``; ONNX Runtime, TFLite and ExecuTorch apply it); ``weight_clips``: ``{layer:
    per-channel clip}`` the weights are clamped to before quantizing (``exporters.weight_rounding``, the same three).
    """

    calibration: np.ndarray
    method: str = "minmax"
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    float_scope: tuple[str, ...] = ()
    bias_correction: dict = field(default_factory=dict)
    weight_clips: dict = field(default_factory=dict)
    percentile: float = 99.999
    batch: int = 1  # the artifact's batch: calibration is fed in chunks of it
    extra: dict = field(default_factory=dict)  # format-specific choices

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; choose one of {', '.join(METHODS)}")
        self.calibration = np.ascontiguousarray(self.calibration, dtype=np.float32)
        self.exclude = tuple(self.exclude)
        self.float_scope = tuple(self.float_scope)

    def bias_fixes(self) -> dict:
        """``bias_correction`` without the layers kept in float (their weights are not rounded)."""
        return {k: v for k, v in self.bias_correction.items() if k not in self.exclude}

    def clip_fixes(self) -> dict:
        """``weight_clips`` without the layers kept in float (their weights stay exact)."""
        return {k: v for k, v in self.weight_clips.items() if k not in self.exclude}

    def kept_in_float(self, names) -> tuple[str, ...]:
        """``exclude`` and the ops of ``float_scope`` among ``names`` (the format's layer names)."""
        present = set(names)
        return self.exclude + tuple(n for n in self.float_scope if n in present and n not in self.exclude)

    def batches(self):
        """The calibration inputs in chunks of ``batch`` rows (the last one padded by repeating its last row)."""
        x = self.calibration
        for i in range(0, len(x), self.batch):
            part = x[i:i + self.batch]
            if len(part) < self.batch:
                part = np.concatenate([part, np.repeat(part[-1:], self.batch - len(part), axis=0)])
            yield part


def check_calibration(src, options: Int8Options) -> str:
    """The name of the one input of the artifact ``src`` that the calibration batches of ``options`` fit;
    ExportError naming the mismatch otherwise."""
    from runtimes.core import ExportError

    if len(src.inputs) != 1:
        raise ExportError(f"INT8 calibration feeds one input, but {src.path} has {len(src.inputs)} "
                          f"({', '.join(src.input_names)}).")
    spec, x = src.inputs[0], options.calibration
    if len(x) == 0:
        raise ExportError(f"INT8 quantization of {src.path} needs calibration samples; none were given.")
    want = (options.batch, *x.shape[1:])
    if len(spec.shape) != len(want) or any(isinstance(d, int) and d != w for d, w in zip(spec.shape, want)):
        raise ExportError(f"calibration batches of shape {want} do not fit input {spec.name} {list(spec.shape)} "
                          f"of {src.path}; give samples of its shape and Int8Options.batch = its batch.")
    return spec.name
