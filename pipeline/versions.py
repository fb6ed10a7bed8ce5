"""The versions of the computations behind the two costliest outputs, bumped on purpose.

Whether a reference cache or a token store is stale is decided by these numbers, not by which source files
changed: editing a message, a loader, the CLI or a writer leaves every cache and store valid (and DVC's
tokenize and reflogp stages unchanged: their code deps are the computing files and this one, see
stages/cli/dvcdeps.py). docs/safety.md, "Stale caches and stores".

LOGP_VERSION: what a reference cache's values are (pipeline/formats.py, provenance `logp_version`): the pairs
drawn (pipeline.refcache.draw_pairs), the dropout masks, each family's forward, the log-softmax sum and its
precision. Bump it with any change that moves a cached value; tests/test_tiny_golden.py fails when the golden
cached log-probs move while it stays. train (any reader) refuses a cache of another version.

TOKEN_ENCODING_VERSION: what a token store's tokens are (part of its build_key): image decoding and
views (pipeline.images), the tokenizers' encoders and quantisers. Bump it with any change that moves a token;
tokenize then encodes every image again (the version enters the store's build_key from version 2 on, so the
stores of version 1 keep theirs).
"""

LOGP_VERSION = 1
TOKEN_ENCODING_VERSION = 1
