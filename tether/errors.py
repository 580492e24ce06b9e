"""The base of every error tether reports to a user as a message rather than a traceback."""


class TetherError(Exception):
    """Bad input or an unusable state, explained in the message (file, line, key, remedy)."""


class RewardError(TetherError):
    """A reward function failed or returned something unusable; names the sample."""
