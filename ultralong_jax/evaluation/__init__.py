"""Long-context evaluation: cached generation, needle-in-a-haystack, perplexity by position,
RULER's synthetic tasks."""
