"""Import TensorFlow without its C++ start-up chatter.

TensorFlow 2.21 writes oneDNN, CUDA-stub and cuInit notices straight to file
descriptor 2 before absl logging is initialised, so TF_CPP_MIN_LOG_LEVEL no
longer hides them. We point fd 2 at a temporary file while TensorFlow is
imported and its devices are listed; if that fails, what was captured is
shown with the error.
"""

from __future__ import annotations

import os
import sys
import tempfile


def import_tensorflow_quietly() -> bool:
    """Import TensorFlow (if installed) with fd 2 captured. True if imported."""
    if "tensorflow" in sys.modules:
        return True
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
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
