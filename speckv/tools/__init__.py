"""Offline tooling: benchmarks, profiling (collect, cost), exact replay and the oracle, training and
evaluation of the controller, the signal study, step-cost shapes, plots and statistics.

Nothing that runs per request imports from here (tests/test_layout.py checks it): the engine, workers,
policies, the controller and its estimates live one level up, in `speckv/`, and the Serve deployments in
`deployments/` build only on those.
"""
