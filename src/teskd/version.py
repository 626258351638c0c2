"""The version of teskd (its own module, so the package's lazy API import is no import circle)."""

__version__ = "0.1.0"
