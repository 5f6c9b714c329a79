"""The error for a flag value or file the user gave that cannot work."""


class UsageError(Exception):
    """A flag value or file the user gave cannot work; the message is one line for the user."""
