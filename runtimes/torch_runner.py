"""Eager PyTorch: a module (training form, plain form, or a loaded ``.pt2``) on CPU or CUDA."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence

import numpy as np

from .core import Artifact, CorruptArtifact, TensorSpec, UntrustedFile, as_numpy, dtype_name, eval_mode, leaves
from .safe_load import load_program

from .base import Runner, check_file, corrupt

__all__ = ["TorchRunner"]

log = logging.getLogger(__name__)


class TorchRunner(Runner):
    """Runs a ``torch.nn.Module`` under ``torch.inference_mode`` with every submodule in eval mode.

    ``device``: "cpu", "cuda" or "auto" (CUDA when present). ``example_inputs`` (or explicit
    ``input_specs``) define the input names/shapes that feeds are checked against; without either,
    feeds are not checked. ``threads`` sets ``torch.set_num_threads`` while active (restored after).
    A ``.pt2`` path is loaded with :func:`runtimes.safe_load.load_program`: an archive that would run
    code when loaded is refused unless ``trust_pickle``.
    """

    runtime = "torch"
    suffixes = (".pt2",)

    def __init__(self, module, *, example_inputs=None, input_specs: Sequence[TensorSpec] | None = None,
                 input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                 device: str = "cpu", threads: int | None = None, name: str | None = None,
                 artifact: Artifact | None = None, trust_pickle: bool = False):
        super().__init__(name, threads=threads, artifact=artifact)
        self.module = module
        self.trust_pickle = trust_pickle
        self.device_request = device
        self.device = None
        self._example = example_inputs
        self._given_specs = list(input_specs) if input_specs is not None else None
        self._input_names = list(input_names) if input_names is not None else None
        self._given_output_names = list(output_names) if output_names is not None else None
        self._saved_threads: int | None = None
        self._eval = None  # the eval-mode context while active

    def activate_impl(self) -> None:
        import torch

        module = self.module
        if isinstance(module, (str, os.PathLike)):
            path = check_file(module, "PyTorch program (.pt2)")
            try:
                module = load_program(path, trust_pickle=self.trust_pickle).module()
            except (UntrustedFile, CorruptArtifact):
                raise
            except Exception as e:
                raise corrupt(path, "PyTorch program (.pt2)", e) from e
        elif isinstance(module, torch.export.ExportedProgram):
            module = module.module()
        want = self.device_request
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested for the torch runner but no CUDA GPU is available; "
                               "use device='cpu' or 'auto'.")
        self.device = torch.device(want)
        # a copy goes to the GPU: Module.to() works in place and would move the caller's model
        self._module = copy.deepcopy(module).to(self.device) if self.device.type != "cpu" else module
        self._eval = eval_mode(self._module)
        self._eval.__enter__()  # left in deactivate_impl
        if self.threads is not None:
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        if self._given_specs is not None:
            self.input_specs = list(self._given_specs)
        elif self._example is not None:
            example = self._example if isinstance(self._example, (tuple, list)) else (self._example,)
            names = self._input_names or [f"input{i}" for i in range(len(example))]
            self.input_specs = [TensorSpec(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in zip(names, example)]
        self.output_names = self._given_output_names or []

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        order = [s.name for s in self.input_specs] if self.input_specs else list(feed)
        args = [torch.from_numpy(np.ascontiguousarray(feed[n])).to(self.device) for n in order]
        with torch.inference_mode():
            out = self._module(*args)
        return [as_numpy(v) for v in leaves(out)]

    def deactivate_impl(self) -> None:
        import torch

        if self._eval is not None:
            self._eval.__exit__(None, None, None)  # the module's own train/eval flags back
            self._eval = None
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None
        self._module = None
