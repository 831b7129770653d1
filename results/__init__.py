"""Results of sampling runs: one table and metric-vs-weight plots (:mod:`results.collect`), sample grids (:mod:`results.grid`)."""
