"""User-facing errors: one clear sentence, no traceback."""


class UserError(Exception):
    """Bad input from a person (path, config, value). The CLI prints it and exits 2."""
