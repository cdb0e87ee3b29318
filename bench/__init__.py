"""fastkd benchmark suites: one ``bench_<family>.py`` per op family on the shared :mod:`bench.harness`."""
