"""cca-pipe library: models, tokenizers, data formats, losses, sampling, metrics.

Nothing in this package imports `stages` (tested), prints, or configures logging.
"""

__version__ = "0.1.0"
