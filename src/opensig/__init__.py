"""opensig: image classifiers that can answer "none of the above"."""

__version__ = "0.1.0"
