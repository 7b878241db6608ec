"""Pipelines that chain stages and own run directories: evaluation of a run (the suite), the
randomized-model control, the quickstart. `evals/` computes results; this package decides
where they are read from and written to, reuses what a run directory already holds, and
records each result in the ledger."""
