"""The tool makes no network call: a conversion through every format asks for no address and opens no
connection, and leaves no child process behind (OpenVINO's usage telemetry forked one that hung in
``getaddrinfo`` after the run had finished)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtimes import core

pytestmark = pytest.mark.e2e  # a whole conversion in a subprocess

pytest.importorskip("openvino")

# Python's audit hooks see every socket a process (or a child forked from it) asks for, whichever library
# asks; the hook refuses it and writes it down, so the test fails on an attempt, not on a timeout.
_CUT = textwrap.dedent("""
    import os, sys
    LOG = sys.argv[1]
    NETWORK = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto",
               "socket.sendmsg")

    def cut(event, args):
        if event in NETWORK:
            with open(LOG, "a") as log:
                log.write(f"{os.getpid()} {event} {args[:2]!r}\\n")
            raise OSError(f"{event}: the network is cut in this test")

    sys.addaudithook(cut)
    from deploy.cli import main

    rc = main(sys.argv[2:])

    def parent(pid):
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])

    children = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if parent(pid) == os.getpid():
                children.append(pid)
        except OSError:
            pass
    print("children:", len(children))
    sys.exit(rc)
""")


def test_a_conversion_asks_for_no_network_and_leaves_no_child(tmp_path):
    script, log = tmp_path / "cut.py", tmp_path / "network.log"
    script.write_text(_CUT)
    proc = subprocess.run([sys.executable, str(script), str(log), "convert", "repvgg_digits",
                           "--targets", "onnx,openvino,tflite", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600)
    attempts = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert attempts == "", f"network calls during a conversion:\n{attempts}"
    assert "children: 0" in proc.stdout, proc.stdout[-500:]
    assert (tmp_path / "run" / "model.xml").exists()  # OpenVINO's converter ran: the telemetry it carries was off


def test_every_usage_reporter_gets_its_stub(tmp_path):
    """NNCF and OpenVINO's converter fall back to their no-op telemetry once ``runtimes`` is imported, even with
    none of the variables that would also turn NNCF's off (the user's own values are kept)."""
    pytest.importorskip("nncf")
    probe = ("import runtimes, os; from nncf.telemetry.wrapper import telemetry, NNCFTelemetryStub; "
             "from openvino.tools.ovc import telemetry_utils; "
             "print(isinstance(telemetry, NNCFTelemetryStub), telemetry_utils.tm.__name__, "
             "os.environ['HF_HUB_OFFLINE'])")
    env = {k: v for k, v in os.environ.items() if k not in core.OFFLINE_ENVIRONMENT}
    env["HF_HUB_OFFLINE"] = "0"  # a value the user set stays
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.split() == ["True", "openvino.tools.ovc.telemetry_stub", "0"], proc.stderr[-2000:]
