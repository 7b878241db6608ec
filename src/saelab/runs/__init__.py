"""Run directories and provenance."""
