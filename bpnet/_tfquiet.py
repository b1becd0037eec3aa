"""Import TensorFlow without its C++ start-up chatter.

TensorFlow 2.21 writes oneDNN, CUDA-stub and cuInit notices straight to file
descriptor 2 before absl logging is initialised, so TF_CPP_MIN_LOG_LEVEL no
longer hides them. We point fd 2 at a temporary file while TensorFlow is
imported and its devices are listed; if that fails, what was captured is
shown with the error.

A Ctrl-C during that import is held until the import ends and then raised:
raised in the middle of it, it lands in TensorFlow's own handlers and
garbage-collection callbacks, which drop it (the run went on as if nothing was
pressed) or abort the process. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading


@contextlib.contextmanager
def _ctrl_c_held():
    """Hold a Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous == signal.SIG_IGN:
        yield  # handlers are set from the main thread only; an ignored SIGINT stays ignored
        return
    pressed = []

    def hold(signum, frame):
        pressed.append(signum)
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C is not held

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def import_tensorflow_quietly() -> bool:
    """Import TensorFlow (if installed) with fd 2 captured. True if imported."""
    if "tensorflow" in sys.modules:
        return True
    sys.stderr.flush()
    saved = os.dup(2)
    with _ctrl_c_held(), tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf
            tf.config.list_physical_devices()
        except ImportError:
            return False
        except BaseException:
            os.dup2(saved, 2)
            capture.seek(0)
            sys.stderr.write(capture.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
    return True
