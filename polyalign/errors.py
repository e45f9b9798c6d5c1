"""One exception type for every user mistake: the CLI prints its message on one line and exits 2."""


class PolyalignError(Exception):
    """Bad input from the user (a file, a flag, a config). Never a bug in polyalign."""
