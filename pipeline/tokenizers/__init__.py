"""Image tokenizers (frozen VQ models)."""
