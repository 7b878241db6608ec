"""Pages from results: plots (matplotlib, inline SVG), the results report, its validator, and
the side-by-side comparison of two SAEs."""
