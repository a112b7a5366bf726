"""tlcore's benchmarks: the asv suite (``asv_*.py``) and pytest-benchmark tests (``bench_*.py``)."""
