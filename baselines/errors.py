"""The one exception type for errors a user can cause (bad path, bad config, missing weights)."""


class FewstepError(Exception):
    """A user-facing error: the CLI prints its message in one line and exits non-zero."""


class ConfigError(FewstepError):
    """A bad experiment config: the CLI exits with code 2."""
