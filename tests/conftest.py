"""Fixtures shared by the command-line, pipeline and inspect tests.

``digits_run`` runs ``python -m deploy`` with no arguments once per session, as a user would: the
built-in trained default converted into ``runs/repvgg_digits`` (ONNX, OpenVINO, TFLite). The CLI,
verify and inspect tests read that one directory instead of converting again.
"""

from __future__ import annotations

import glob
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def terminate_when(proc: subprocess.Popen, ready: str, timeout: float, poll: float = 0.1,
                   settle: float = 0.0) -> tuple[str, float]:
    """Send SIGTERM to ``proc`` once a file matching the glob ``ready`` exists (and ``settle`` seconds more):
    its stderr and the seconds it took to exit after the signal. It must not exit first nor take longer than
    ``timeout`` to get ready; it is killed if still alive at the end."""
    try:
        deadline = time.monotonic() + timeout
        while not glob.glob(ready):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(poll)
        time.sleep(settle)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        return err, time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_deploy(*args: str, cwd, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m deploy ARGS`` in ``cwd``, offline (no model hub), with this checkout first on sys.path."""
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                    HF_HUB_OFFLINE="1")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "deploy", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """(completed process, output directory) of ``python -m deploy`` run with no arguments."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    pytest.importorskip("litert_torch")
    cwd = tmp_path_factory.mktemp("default_run")
    proc = run_deploy(cwd=cwd)
    return proc, cwd / "runs" / "repvgg_digits"


def main_in_process(capsys, *argv: str) -> tuple[int, str, str]:
    """``deploy ARGV`` in this process: (exit status, stdout, stderr); argparse's refusals exit 2 too."""
    from deploy import cli

    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(autouse=True)
def _restore_logging():
    """cli.main configures logging and warnings for a terminal; undo that for the next test."""
    filters, root = warnings.filters[:], logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    warnings.filters[:] = filters
    root.handlers[:], root.level = handlers, level
    logging.captureWarnings(False)


def error_line(err: str) -> str:
    """The one error sentence on stderr (progress lines start with '['), and no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("deploy ")]
    assert len(lines) == 1, err
    assert lines[0].endswith("."), lines[0]
    return lines[0]


def leftovers(directory) -> list[str]:
    """The partial and superseded folders of runs left in ``directory``."""
    return [p.name for p in directory.iterdir() if ".partial-" in p.name or ".old-" in p.name]
