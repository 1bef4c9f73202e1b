"""The one error type the converters raise for bad input (it names the file / tensor / key / value)."""

__all__ = ["ConversionError"]


class ConversionError(ValueError):
    """Bad conversion input: unknown architecture, missing / unexpected tensor, shape mismatch, a parallel
    layout that does not divide the model, unreadable files, an invalid checkpoint directory."""
