"""Long-context evaluation: cached generation, needle-in-a-haystack, perplexity by position,
RULER-style synthetic tasks."""
