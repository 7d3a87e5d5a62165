"""Benchmarks and the real image sets they use. Run each from the repository root as a
module, e.g. ``python -m bench.bench_ivf`` or ``python -m bench.fashion_set --data-dir data``."""
