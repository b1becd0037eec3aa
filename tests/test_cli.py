"""The bpnet command line: version, light --help, one-line errors, status.json."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import bpnet
from conftest import bpnet_cli, invoke

HEAVY = ("tensorflow", "keras", "onnxruntime", "onnx", "tf2onnx", "jax", "torch", "tensorrt")


def test_version():
    r = bpnet_cli("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"bpnet, version {bpnet.__version__}"


def test_help_imports_nothing_heavy():
    code = f"""
import json, sys
from bpnet.cli import main
names = sorted(main.commands)
for args in [["--help"]] + [[n, "--help"] for n in names]:
    try:
        rc = main(args, prog_name="bpnet")
    except SystemExit as e:
        rc = e.code
    assert rc in (0, None), (args, rc)
print(json.dumps({{"commands": names, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert {"dataset_convert", "make_sample_data"} <= set(out["commands"])


def test_help_lists_tao_options():
    r = bpnet_cli("dataset_convert", "--help")
    assert r.returncode == 0
    for opt in ("--dataset_spec", "--output_filename", "--mode", "--num_partitions", "--num_shards",
                "--generate_masks", "--check_files", "--results_dir", "--log_level"):
        assert opt in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["dataset_convert"], "Missing option '-d' / '--dataset_spec'"),
    (["dataset_convert", "-d", "x.json", "-o", "out", "-p", "0"], "--num_partitions"),
    (["dataset_convert", "-d", "x.json", "-o", "out", "-m", "validation"], "'validation' is not one of"),
    (["no_such_task"], "No such command 'no_such_task'"),
    (["make_sample_data", "-o", "x", "--image_size", "big"], "--image_size"),
])
def test_bad_arguments_one_line(tmp_path, args, needle):
    r = bpnet_cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "error:" in lines[0] and needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written for a usage error


def test_task_error_is_one_line_and_status_failure(tmp_path):
    r = bpnet_cli("dataset_convert", "-d", tmp_path / "missing_spec.json", "-o", tmp_path / "o",
                  "-r", tmp_path / "res")
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"bpnet dataset_convert: error: {tmp_path / 'missing_spec.json'}: file not found"]
    status = json.loads((tmp_path / "res" / "status.json").read_text())
    assert status["task"] == "dataset_convert" and status["status"] == "FAILURE"
    assert "file not found" in status["message"]


def test_debug_log_level_shows_traceback(tmp_path):
    r = bpnet_cli("dataset_convert", "-d", tmp_path / "missing.json", "-o", tmp_path / "o",
                  "-r", tmp_path / "res", "-ll", "DEBUG")
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "file not found" in r.stderr


def test_status_success_with_summary(tmp_path):
    res = invoke("make_sample_data", "-o", tmp_path / "data", "--num_train", "3",
                 "--num_val", "1", "--image_size", "96", "128", "-r", tmp_path / "res")
    assert res.exit_code == 0, res.output
    status = json.loads((tmp_path / "res" / "status.json").read_text())
    assert status["status"] == "SUCCESS" and status["task"] == "make_sample_data"
    assert status["train"]["images"] == 3 and status["val"]["images"] == 1
    assert Path(status["dataset_spec"]).is_file()
    res = invoke("dataset_convert", "-d", status["dataset_spec"], "-o", tmp_path / "rec" / "train",
                 "--workers", "1", "--generate_masks", "-r", tmp_path / "res2")
    assert res.exit_code == 0, res.output
    status = json.loads((tmp_path / "res2" / "status.json").read_text())
    assert status["status"] == "SUCCESS" and status["records"] >= 1
    assert status["files"] == [str(tmp_path / "rec" / "train-fold-000-of-001")]


def test_tensorflow_runtime_errors_come_out_as_their_useful_line():
    tf = pytest.importorskip("tensorflow")
    from bpnet.cli import tensorflow_error_message
    nf = tf.errors.NotFoundError(
        None, None, "{{function_node __wrapped__IteratorGetNext_output_types_4_device_/job:localhost"
        "/replica:0/task:0/device:CPU:0}} /data/x.jpg; No such file or directory\n"
        "\t [[{{node ReadFile}}]] [Op:IteratorGetNext] name: ")
    assert tensorflow_error_message(nf) == "/data/x.jpg; No such file or directory"
    wrapped = tf.errors.UnknownError(
        None, None, "BpnetError: cannot read the mask /m/1.png: No such file or directory\n"
        "Traceback (most recent call last):\n  File \"pipeline.py\", line 199, in _read\n"
        "bpnet.errors.BpnetError: cannot read the mask /m/1.png: No such file or directory\n\n"
        "\t [[{{node PyFuncStateless_1}}]]")
    assert tensorflow_error_message(wrapped) == "cannot read the mask /m/1.png: No such file or directory"
    assert tensorflow_error_message(ValueError("not from tensorflow")) is None


def test_ctrl_c_while_tensorflow_imports_is_held_then_raised():
    """A Ctrl-C during TensorFlow's import is raised when the import ends (raised inside it,
    TensorFlow's handlers and GC callbacks can drop it); an ignored SIGINT stays ignored."""
    import signal

    from bpnet._tfquiet import _signals_held
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with _signals_held():
            # raise_signal: to this (the main) thread, handled before it returns; os.kill
            # could reach another thread of the process and be handled late.
            signal.raise_signal(signal.SIGINT)
            for _ in range(1000):  # bytecode runs on: a raised interrupt would land here
                pass
            reached.append(True)
    assert reached == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _signals_held():
            signal.raise_signal(signal.SIGINT)
            for _ in range(1000):
                pass
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_stops_a_command_like_ctrl_c_and_is_held_during_the_tensorflow_import():
    """While a command runs, SIGTERM (kill, a job scheduler) raises Terminated, a
    KeyboardInterrupt, in the main thread; during TensorFlow's import it is held like Ctrl-C.
    Outside a command SIGTERM keeps its default action."""
    import signal

    from bpnet._tfquiet import _signals_held
    from bpnet.cli import _sigterm_stops
    from bpnet.errors import Terminated
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    reached = []
    with pytest.raises(Terminated):
        with _sigterm_stops(), _signals_held():
            signal.raise_signal(signal.SIGTERM)
            for _ in range(1000):
                pass
            reached.append(True)
    assert reached == [True]
    with pytest.raises(Terminated):
        with _sigterm_stops():
            signal.raise_signal(signal.SIGTERM)
            for _ in range(1000):
                pass
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored after the command
