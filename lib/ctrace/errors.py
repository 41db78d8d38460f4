"""User-facing errors: a message that names the file, the field and the fix."""


class CtraceInputError(ValueError):
    """Bad user input (config, data file, checkpoint). The CLI prints it without a traceback."""
