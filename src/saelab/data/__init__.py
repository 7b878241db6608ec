"""Text sources: registry-fetched assets, the embedded corpus, local files."""
