"""Models: loading (embedded, local, hub) and hook points."""
