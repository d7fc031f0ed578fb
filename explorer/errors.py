"""The one error type the explorer shows to users as it is."""


class AnalysisError(ValueError):
    """Bad input or an incompatible checkpoint; the message is meant for the user."""
