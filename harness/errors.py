"""Exit codes and the harness's own error, in a module that imports nothing of the model: the CLI
must still start (and ``imports`` report a broken module precisely) when ``qwen3_vl`` cannot import."""

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


class HarnessError(Exception):
    """The harness cannot run as asked (bad input, missing device, unwritable store): one line, exit 2."""
