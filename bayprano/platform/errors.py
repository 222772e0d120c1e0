"""Errors that the command line reports as one line, naming the file, field or value at fault."""


class BaypranoError(ValueError):
    """A problem with user input (a file, a field, a value); its message is shown to the user as is."""


class DataError(BaypranoError):
    """A dataset, image, mask or shard that cannot be used as given."""


class ConfigError(BaypranoError):
    """A configuration value or command-line option that is out of range or inconsistent."""
