"""Models, loss, optimizer, learning-rate schedules and model files.

Importing this package is cheap; Keras is imported by the submodules.
"""


def register_custom_objects():
    """Import the modules whose Keras objects are registered for (de)serialization."""
    from . import optimizer, schedules  # noqa: F401  (registration happens on import)
