"""Errors a user can cause: the CLI prints them as one line, no traceback."""


class MixtralError(Exception):
    """A user-caused error with a plain, one-line message."""


class ConfigError(MixtralError):
    """A model config, preset or mesh spec that cannot be used."""


class CheckpointError(MixtralError):
    """A checkpoint or source folder that is missing, incomplete or inconsistent."""


class ChatFormatError(MixtralError):
    """A chat message list that the Mistral instruct format cannot encode."""


class DataError(MixtralError):
    """Training data that is missing, unreadable or too short for the requested batches."""


class TrainingDiverged(MixtralError):
    """A training step whose loss or gradient is not finite."""
