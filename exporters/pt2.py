"""The plain model as a ``torch.export`` program (``model.deploy.pt2``): the reference every other
artifact is compared with, and the torch runtime's artifact.

The module is re-exported with ``torch.export.export`` (a dynamic batch dimension ``batch`` with
``dynamic=True``) and saved with ``torch.export.save``; ``metadata`` goes into the archive as
``deploy.json``. The program is saved without its example inputs (which ``torch.export.save``
pickles); its weights and constants are raw tensor bytes, so loading it unpickles nothing. The
written file is checked with ``runtimes.pt2_archive.scan`` (see that module).
"""

from __future__ import annotations

import json
import os

from runtimes.core import Artifact, ExportError, TensorSpec, first_line, output_leaves
from runtimes.pt2_archive import scan

from ._torch import to_graph_module
from .targets import ExportJob, Product, Target

__all__ = ["export_pt2", "TARGET", "FILENAME"]

FILENAME = "model.deploy.pt2"


def export_pt2(model, args: tuple, path, *, dynamic: bool = False, metadata: dict | None = None) -> Artifact:
    """Save ``model`` (traced on ``args``) as a torch.export program at ``path``; its artifact record."""
    import torch

    module = to_graph_module(model, args)
    dynamic_shapes = ({0: torch.export.Dim("batch")},) + (None,) * (len(args) - 1) if dynamic else None
    try:
        ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:
        if dynamic:
            raise ExportError(f"--dynamic: the plain model cannot take a dynamic batch ({first_line(e)}); its "
                              "graph fixes the batch size: convert without --dynamic") from e
        raise ExportError(f"torch.export cannot re-export the plain model: {first_line(e)}") from e
    ep.example_inputs = None  # torch.save'd into the archive otherwise: loading would unpickle them
    torch.export.save(ep, os.fspath(path), extra_files={"deploy.json": json.dumps(metadata or {})})
    found = scan(path)
    if found:
        raise ExportError(f"the plain model's program holds {'; '.join(found)}, which would run code when it is "
                          "loaded; a deploy form should hold plain tensors only")
    leaves = output_leaves(module, args)
    batch = "batch" if dynamic else None
    inputs = [TensorSpec(f"input{i}", ((batch,) + tuple(a.shape[1:])) if batch else tuple(a.shape), "float32")
              for i, a in enumerate(args)]
    outputs = [TensorSpec(f"output{i}", ((batch,) + tuple(t.shape[1:])) if batch and t.dim() else tuple(t.shape),
                          str(t.dtype)) for i, t in enumerate(leaves)]
    return Artifact(os.fspath(path), "pt2", inputs, outputs, "fp32",
                    metadata={"exporter": f"torch.export (torch {torch.__version__})", "dynamic_batch": dynamic})


def _export(job: ExportJob) -> list[Product]:
    art = export_pt2(job.module, job.args, job.folder / FILENAME, dynamic=job.dynamic, metadata=job.metadata)
    return [Product("pt2", art)]


TARGET = Target(
    name="pt2", runtime="torch", suffixes=(".pt2",), source="torch", export=_export,
    function="exporters.pt2:export_pt2", runner="runtimes.torch_runner:TorchRunner", precisions=("fp32",),
    inspect="deploy.inspect:read_torch", always=True,
    description="the plain model as a torch.export program (model.deploy.pt2)",
)
