"""The configuration error every engine module may raise (a CLI turns it into exit code 2)."""


class ConfigError(ValueError):
    """Invalid configuration; the message names the flag (or YAML key, or file) and the fix."""
