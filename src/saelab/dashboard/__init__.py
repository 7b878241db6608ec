"""The feature dashboard: static pages over a run (build.py) and a local server (serve.py)."""
