"""TFLite export with litert-torch (``litert_torch.convert(module, args).export(path)``).

- The model is captured as a GraphModule and legalized for TFLite first (:mod:`exporters.legalize`:
  integer ``x ** n`` becomes multiplications, checked in float64).
- fp32 by default. fp16 uses litert-torch's ``full_fp16_recipe`` quantization config (run by
  ai-edge-quantizer): weights are stored as fp16 and dequantized to fp32 by a ``DEQUANTIZE`` op,
  the standard TFLite "float16 quantization"; the XNNPACK CPU delegate and the GPU delegate may
  then compute in fp16. Inputs and outputs stay fp32.
- ``nhwc=True`` wraps the module with ``litert_torch.to_channel_last_io`` so 4-D inputs (and, with
  ``nhwc_outputs``, 4-D outputs) are channels-last, the layout mobile pipelines feed.
- The record's outputs follow the torch output order. litert-torch names the signature outputs after
  the output tree (``output_<i>``, or a dict's keys) and the signature lists them by name;
  ``metadata["tflite_outputs"]`` holds those names in the torch order, and the LiteRT runner reads
  the outputs by them (see ``runtimes.litert_runner``).
- int8 (full-integer, float32 inputs/outputs) is made from the fp32 artifact and the plain module by
  ``exporters.tflite_int8.quantize_tflite`` (the record's ``quantize``), with litert-torch's PT2E quantizer.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtimes.core import (Artifact, ExportError, TensorSpec, check_precision, eval_mode, first_line, require,
                           set_training)

from ._torch import as_args, io_names, output_leaves, to_graph_module
from .targets import ExportJob, Product, Target
from .legalize import legalize_for_tflite

__all__ = ["export_tflite", "describe_tflite", "litert_output_names", "legalize_error", "quiet_litert", "EXTRA",
           "TARGET"]

log = logging.getLogger(__name__)
EXTRA = "tflite"


@contextlib.contextmanager
def quiet_litert():
    """litert-torch prints progress (rich), ai-edge-quantizer sizes and tqdm bars: send them to the log."""
    saved = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield
    finally:
        if saved is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = saved
        if buf.getvalue().strip():
            log.debug("litert-torch output:\n%s", buf.getvalue().strip())


def _indices(flag: bool | Sequence[int], tensors: Sequence) -> list[int]:
    if flag is True:
        return [i for i, t in enumerate(tensors) if getattr(t, "ndim", 0) == 4]
    if not flag:
        return []
    return list(flag)


def legalize_error(exc: BaseException) -> ExportError:
    """litert-torch's failure as one sentence: the op TFLite cannot express (and where), or its first line."""
    text = str(exc)
    m = re.search(r"failed to legalize operation '([^']+)'", text)
    if m:
        loc = re.search(r"([^\s:]+\.py:\d+):\d+: error", text)
        where = f" (from {loc.group(1)})" if loc else ""
        return ExportError(f"TFLite cannot express op {m.group(1)}{where}: litert-torch failed to legalize it.")
    return ExportError(f"litert-torch could not convert the model to TFLite: {first_line(exc)}")


def litert_output_names(outputs) -> list[str]:
    """The signature output names litert-torch gives a module returning ``outputs``, in the torch order:
    ``output_<i>`` unless the output is a dict, whose leaves are named by their path of keys (and list
    or tuple indices) joined with ``_``."""
    from torch.utils import _pytree as pytree

    flat = pytree.tree_flatten_with_path(outputs)[0]
    if not isinstance(outputs, dict):
        return [f"output_{i}" for i in range(len(flat))]
    part = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))  # noqa: E731
    return ["_".join(part(k) for k in path) for path, _ in flat]


def describe_tflite(path, *, input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                    precision: str = "fp32", parent: str | None = None,
                    tflite_outputs: Sequence[str] | None = None) -> Artifact:
    """An artifact record for a ``.tflite`` file, read back through the LiteRT interpreter.

    ``tflite_outputs``: the signature's output names in the model's order, when known (from
    :func:`litert_output_names`); else the runner works the order out (see ``runtimes.litert_runner``).
    """
    from runtimes.litert_runner import LiteRTRunner

    runner = LiteRTRunner(path, output_order=tflite_outputs)
    with runner:
        specs, n_out = runner.get_input_specs(), len(runner.output_names)
        natives_in, natives_out, signature = runner.native_inputs, runner.native_outputs, runner.signature
        feed = {s.name: np.zeros(s.concrete_shape(1), s.dtype) for s in specs}
        outs = list(runner.infer(feed).values())
    if tflite_outputs is not None and list(tflite_outputs) != natives_out:
        log.warning("%s: litert-torch named the outputs %s, expected %s; reading them in the order of the graph's "
                    "outputs", path, ", ".join(natives_out), ", ".join(tflite_outputs))
    in_names = io_names(input_names, len(specs), "input")
    out_names = io_names(output_names, n_out, "output")
    return Artifact(
        path=os.fspath(path), format="tflite",
        inputs=[TensorSpec(n, s.shape, s.dtype) for n, s in zip(in_names, specs)],
        outputs=[TensorSpec(n, o.shape, o.dtype.name) for n, o in zip(out_names, outs)],
        precision=precision, parent=parent,
        metadata={"signature": signature, "tflite_inputs": natives_in, "tflite_outputs": natives_out},
    )


def export_tflite(model, args, path, *, precision: str = "fp32", nhwc: bool | Sequence[int] = False,
                  nhwc_outputs: bool | Sequence[int] = False, input_names: Sequence[str] | None = None,
                  output_names: Sequence[str] | None = None, legalize: bool = True,
                  allow_unsupported_pow: bool = False) -> Artifact:
    """Convert ``model`` (traced on ``args``, NCHW) to a ``.tflite`` file; see the module docstring."""
    check_precision(precision, fmt="TFLite")
    litert_torch = require("litert_torch", EXTRA, "TFLite export")
    require("ai_edge_litert", EXTRA, "reading TFLite files back")
    import torch

    args = as_args(args)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = to_graph_module(model, args)
    notes = []
    rewrites = []
    if legalize:
        module, rewrites = legalize_for_tflite(module, args, allow_unsupported_pow=allow_unsupported_pow)
        if rewrites:
            notes.append(f"legalized {len(rewrites)} pow node(s) into multiplications for TFLite "
                         "(pass pow_to_mul, proven exact in float64)")
    leaves = output_leaves(module, args)
    with torch.no_grad(), eval_mode(module):
        signature_outputs = litert_output_names(module(*args))
    in_idx, out_idx = _indices(nhwc, args), _indices(nhwc_outputs, leaves)
    sample = args
    if in_idx or out_idx:
        if any(args[i].ndim != 4 for i in in_idx) or any(leaves[i].ndim != 4 for i in out_idx):
            raise ExportError("nhwc layout applies to 4-D (N, C, H, W) tensors only.")
        module = litert_torch.to_channel_last_io(module, args=in_idx, outputs=out_idx)
        set_training(module, False)
        sample = tuple(a.permute(0, 2, 3, 1).contiguous() if i in in_idx else a for i, a in enumerate(args))
    quant_config = None
    if precision == "fp16":
        from litert_torch.generative.quantize import quant_recipes

        quant_config = quant_recipes.full_fp16_recipe()
    if path.exists():
        path.unlink()
    try:
        with quiet_litert(), torch.no_grad():
            edge = litert_torch.convert(module, sample, quant_config=quant_config)
            edge.export(os.fspath(path))
    except ExportError:
        raise
    except Exception as e:
        raise legalize_error(e) from e
    art = describe_tflite(path, input_names=input_names, output_names=output_names, precision=precision,
                          tflite_outputs=signature_outputs)
    for note in notes:
        art.note(note)
    art.metadata.update(
        layout={"inputs": ["NHWC" if i in in_idx else "NCHW" for i in range(len(args))],
                "outputs": ["NHWC" if i in out_idx else "native" for i in range(len(leaves))]},
        rewrites=list(rewrites),
        exporter=f"litert-torch {getattr(litert_torch, '__version__', '?')}",
    )
    if precision == "fp16":
        art.note("fp16 weights (litert-torch full_fp16_recipe: fp16 constants + DEQUANTIZE), fp32 inputs/outputs")
    log.info("exported %s (%s)", path, precision)
    return art


def _export_target(job: ExportJob) -> list[Product]:
    return [Product("tflite", export_tflite(job.module, job.args, job.folder / "model.tflite",
                                            precision=job.precision))]


def _native(precision: str, cpu: dict) -> str:
    # Measured on an x86 CPU with avx512_fp16: an fp16-weight model whose activations pass fp16's range runs
    # without overflow, so LiteRT computes it in fp32 there too (tests/test_exporters_tflite.py checks this).
    # Only ARM CPUs with fp16 arithmetic (asimdhp, fphp) keep the candidate, where XNNPACK may compute in fp16.
    if precision == "fp16" and not set(cpu.get("simd", ())) & {"asimdhp", "fphp"}:
        return ("LiteRT's CPU delegate (XNNPACK) computes an fp16-weight model in fp32 on x86 CPUs, those with "
                "avx512_fp16 included: it is the fp32 candidate with smaller weights")
    return ""


TARGET = Target(
    name="tflite", title="TFLite", runtime="tflite", suffixes=(".tflite",), source="torch",
    export=_export_target, function="exporters.tflite:export_tflite", runner="runtimes.litert_runner:LiteRTRunner",
    requires=(("litert_torch", EXTRA), ("ai_edge_litert", EXTRA)), inspect="deploy.inspect:read_tflite",
    precisions=("fp32", "fp16", "int8"), quantize="exporters.tflite_int8:quantize_tflite", native=_native,
    default=True, bench_note={"delegate": "XNNPACK (LiteRT default)"}, mobile=True,
    description="TFLite through litert-torch, run on LiteRT",
)
