"""Exporters: one module per artifact format, each declaring its :class:`~exporters.targets.Target`.

    >>> from exporters import export
    >>> onnx_art = export("onnx", plain_model, "out/model.onnx", args=(x,))
    >>> ov_art = export("openvino", onnx_art, "out/model.xml")
    >>> tfl_art = export("tflite", plain_model, "out/model.tflite", args=(x,), precision="fp16")

Formats that read a torch module take ``args`` (example inputs); OpenVINO and TensorRT read the
ONNX artifact. An op a format cannot express raises :class:`ExportError` naming op and format;
a missing optional package raises :class:`MissingDependency` naming the pip extra. Heavy packages
are imported only when a format is used. ``exporters.targets`` is the registry the pipeline,
``deploy verify``, ``deploy inspect`` and ``deploy bench`` look formats up in.

``exporters`` sits above ``runtimes``: it imports runners and the shared vocabulary
(``runtimes.core``); nothing in ``runtimes`` imports ``exporters``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from runtimes.core import Artifact, CorruptArtifact, DeployError, ExportError, MissingDependency, TensorSpec

from . import targets
from .targets import Target

__all__ = [
    "Artifact",
    "TensorSpec",
    "DeployError",
    "ExportError",
    "MissingDependency",
    "CorruptArtifact",
    "Target",
    "targets",
    "export",
    "exporter",
    "open_runner",
]


def exporter(fmt: str) -> Callable[..., Artifact]:
    """The export function of ``fmt``."""
    try:
        target = targets.get(fmt)
    except KeyError as e:
        raise ValueError(f"unknown export format {fmt!r}; known formats: {', '.join(targets.names())}") from e
    if target.function is None:
        raise ValueError(f"format {fmt!r} has no library export function; use its target's export step")
    return targets.resolve(target.function)


def export(fmt: str, model_or_artifact: Any, path, *, args=None, **options) -> Artifact:
    """Export ``model_or_artifact`` to ``path`` in format ``fmt`` ("onnx", "openvino", "tflite", "tensorrt", "pt2").

    ``args`` are the example inputs for formats that trace a torch module (and for OpenVINO when
    given a module); ``options`` go to the format's function (``precision=``, ``dynamic=``, ...).
    """
    func = exporter(fmt)
    if targets.get(fmt).source == "torch":
        if isinstance(model_or_artifact, Artifact):
            raise ExportError(f"{fmt} export needs the torch module, not the {model_or_artifact.format} artifact "
                              f"{model_or_artifact.path}.")
        if args is None:
            raise ExportError(f"{fmt} export of a torch module needs example inputs (args=).")
        return func(model_or_artifact, args, path, **options)
    if args is not None and fmt == "openvino":  # OpenVINO can also convert a torch module
        options["args"] = args
    return func(model_or_artifact, path, **options)


def open_runner(artifact: Artifact | str, **kwargs):
    """A runner for an artifact record or a file of any registered target (chosen by format, else by suffix)."""
    import os

    if isinstance(artifact, Artifact):
        target = targets.get(artifact.format) if artifact.format in targets.names(selectable=False) else None
        target = target or targets.by_suffix(artifact.path)
    else:
        target = targets.by_suffix(artifact)
    if target is None:
        raise ValueError(f"cannot tell the format of {getattr(artifact, 'path', artifact)}; known suffixes: "
                         f"{', '.join(s for t in targets.all_targets() for s in t.suffixes)}")
    return target.open(artifact if isinstance(artifact, Artifact) else os.fspath(artifact), **kwargs)
