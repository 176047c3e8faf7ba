"""Nothing lost: inputs never change, Ctrl-C leaves nothing behind, a failure mid-run says what was done."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import fgq_onnx


def test_in_memory_inputs_are_not_modified(kit, calib_npz):
    proto = kit.build_cnn()
    proto_bytes = proto.SerializeToString()
    model = ir.serde.deserialize_model(proto)
    model_bytes = ir.serde.serialize_model(model).SerializeToString()
    fgq_onnx.convert(proto, n=4, calib=calib_npz)
    fgq_onnx.convert(model, n=4, calib=calib_npz)
    assert proto.SerializeToString() == proto_bytes
    assert ir.serde.serialize_model(model).SerializeToString() == model_bytes


def _sigint_as_at_a_terminal() -> None:
    """Ctrl-C's default action in the child: a shell without job control starts background jobs with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test, even when the run started with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_calibration(kit, tmp_path):
    """SIGINT while the fp32 calibration pass runs: one line, exit 130, no output, no temporary files, input unchanged."""
    work, temp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    temp.mkdir()
    model = kit.write_model(kit.build_cnn(), work / "cnn.onnx")
    np.savez(work / "calib.npz", x=np.random.default_rng(0).uniform(0, 1, (20_000, 1, 28, 28)).astype(np.float32))
    before = kit.listing(work)
    env = dict(os.environ, TMPDIR=str(temp), PYTHONPATH=str(Path(fgq_onnx.__file__).resolve().parent.parent))
    process = subprocess.Popen([sys.executable, "-m", "fgq_onnx.cli", "convert", str(model), "--calib", str(work / "calib.npz"),
                                "--refine-samples", "20000", "-o", str(work / "out.onnx")],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_sigint_as_at_a_terminal)
    deadline = time.monotonic() + 120
    while not list(temp.glob("fgq-*")):  # calibration works in a temporary folder of its own
        assert process.poll() is None and time.monotonic() < deadline, "calibration never started"
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 130, stderr
    assert len(lines) == 1 and "interrupted" in lines[0] and "no output" in lines[0], stderr
    assert "Traceback" not in stderr + stdout
    assert kit.listing(work) == before
    assert not list(temp.glob("fgq-*")) and not list(temp.rglob("*.onnx")), "temporary files left behind"  # (onnxruntime leaves a .ses id file)


def test_ctrl_c_waits_for_the_file_being_written_then_stops(tmp_path, python_sigint_handler):
    """A SIGINT while a block writes is held until the block ends (its file closed), then raised as KeyboardInterrupt."""
    from fgq_onnx import model_io

    stream = None
    with pytest.raises(KeyboardInterrupt), model_io.interrupts_deferred():
        stream = open(tmp_path / "f.bin", "wb")  # noqa: SIM115 - closed inside the block on purpose
        os.kill(os.getpid(), signal.SIGINT)
        stream.write(b"complete")
        stream.close()
    assert stream is not None and stream.closed and (tmp_path / "f.bin").read_bytes() == b"complete"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is Python's again


def test_temporary_folder_is_removed_when_interrupted(tmp_path, monkeypatch, python_sigint_handler):
    from fgq_onnx import model_io

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    with pytest.raises(KeyboardInterrupt), model_io.temporary_folder("fgq-test-") as folder:
        (folder / "calibration.onnx").write_bytes(b"x")
        os.kill(os.getpid(), signal.SIGINT)
    assert folder.parent == tmp_path and not folder.exists()


def test_failure_mid_run_says_what_was_done(cli, kit, tmp_path, cnn_path, calib_npz, monkeypatch):
    """Bias correction failing at the second layer: the message lists the stages done, names the layer, and that nothing was written."""
    from fgq_onnx import layerwise
    from fgq_onnx.errors import FgqError

    real, calls = layerwise.affine_correction, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise FgqError("the statistics are not finite")
        return real(*args, **kwargs)

    monkeypatch.setattr(layerwise, "affine_correction", failing)
    before = kit.listing(tmp_path)
    result = cli("convert", cnn_path, "--calib", calib_npz)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert lines[0] == ("error: the fp32 calibration pass, ternarization, activation calibration done; "
                        "bias correction failed at layer conv2: the statistics are not finite; nothing written")
    assert kit.listing(tmp_path) == before


def test_refusal_while_loading_has_no_progress_prefix(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"\x08" * 100)
    try:
        fgq_onnx.convert(path, act_bits=0)
    except fgq_onnx.FgqError as error:
        assert "done;" not in str(error) and "nothing written" not in str(error)
    else:
        raise AssertionError("a corrupt file converted")
