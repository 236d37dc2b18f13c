"""The label vocabulary: how "none of the known classes" and an image of several classes are
written, in files (manifest, predictions, the data folder) and in arrays.

Every module takes these from here, so the word, the separator and the index cannot drift.
"""

UNKNOWN_LABEL = "unknown"
"""The label of an image of none of the known classes: in the manifest, predict's and the
served model's answers, the prediction log, and the data folder ``unknown/<source>/``."""

LABEL_SEP = "|"
"""Separates the classes of one image: ``cat|dog`` (multi-label data, from a labels CSV)."""

UNKNOWN: int = -1
"""The class index of an unknown image in label and decision arrays; known classes are
``0..K-1``."""
