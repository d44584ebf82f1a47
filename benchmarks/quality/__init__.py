"""Real-data quality benchmark: data built from public sets shipped inside PyPI wheels (see README.md)."""
