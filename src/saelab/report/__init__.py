"""Reports: plots (matplotlib, PNG) of the results the stages write."""
