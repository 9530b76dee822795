"""The one exception of the config layer: a job that cannot run."""


class ConfigError(ValueError):
    """A job config that cannot run; the message names the file, the key and the fix."""
