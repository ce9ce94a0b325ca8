"""The one error type for what a user can fix (a bad config value, input, folder): commands print it in one line."""


class InputError(ValueError):
    """Bad input named in words: a config key or value, an image batch, a folder, a budget. Internal bugs raise
    anything else and keep their traceback."""
