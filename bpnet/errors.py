"""The one exception type that the command line turns into a clean message."""


class BpnetError(Exception):
    """A problem the user can fix (bad spec, missing file, bad data).

    The CLI prints its message on one line and exits non-zero; any other
    exception is a bug and shows a traceback only with --log_level DEBUG.
    """


class SpecError(BpnetError):
    """A spec or config file that cannot be read or does not validate."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler's stop, ``docker stop``), raised in the main thread
    while a command runs: handled like Ctrl-C (what was written is kept, locks are released,
    status.json says so), exit code 143."""
