"""The exceptions a user can cause; each message names the field, file or line and what to do.

They live below every other module so that the data pipeline, the models and the config check
can all raise them without importing each other.
"""


class ConfigError(ValueError):
    """A config value a user set is invalid; the message names the field and what to do."""


class DataError(ValueError):
    """Bad input data or a bad prepared dataset; the message names the file, line or field."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message names the step."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used; the message names the step and the folder."""


class WorkdirInUseError(ConfigError):
    """Another training run holds the --workdir lock; the message names it and what to do."""
