"""Import TensorFlow without its C++ start-up chatter.

TensorFlow 2.21 writes oneDNN, CUDA-stub and cuInit notices straight to file
descriptor 2 before absl logging is initialised, so TF_CPP_MIN_LOG_LEVEL no
longer hides them. We point fd 2 at a temporary file while TensorFlow is
imported and its devices are listed; if that fails, what was captured is
shown with the error.

A Ctrl-C (or a SIGTERM, which bpnet's commands handle alike) during that import
is held until the import ends and then raised: raised in the middle of it, it
lands in TensorFlow's own handlers and garbage-collection callbacks, which drop
it (the run went on as if nothing was pressed) or abort the process. A second
one interrupts at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading


@contextlib.contextmanager
def _signals_held():
    """Hold a Ctrl-C (SIGINT), or a SIGTERM bpnet handles, until the block ends, then deliver
    it again to its handler (KeyboardInterrupt, ``Terminated``). A second one is not held."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers are set from the main thread only
        return
    # Only Python handlers are held: an ignored or default (killing) signal keeps its action.
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if callable(h)}
    pressed = []

    def hold(signum, frame):
        pressed.append(signum)
        signal.signal(signum, previous[signum])  # a second one is not held

    for s in previous:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if pressed:
        signal.raise_signal(pressed[0])  # its own handler raises it here, in the main thread


def import_tensorflow_quietly() -> bool:
    """Import TensorFlow (if installed) with fd 2 captured. True if imported."""
    if "tensorflow" in sys.modules:
        return True
    sys.stderr.flush()
    saved = os.dup(2)
    with _signals_held(), tempfile.TemporaryFile() as capture:
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
