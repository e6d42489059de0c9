"""Benchmarks as a library: workloads, timed runs against the right baselines, sweeps and the
dispatch-overhead measurement. Results are dicts; ``tilefleet bench`` (the CLI) prints them."""
