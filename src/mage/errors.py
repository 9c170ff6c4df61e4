"""One exception type for every user-facing error: the CLI prints it as one line and exits 2."""


class MageError(Exception):
    """A problem the user can fix (bad input, missing file, unknown preset, ...)."""


class UnsafeFileError(MageError):
    """A file that only code could load (a pickle global outside the allow-list): refused, nothing was run."""
