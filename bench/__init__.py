"""``python -m bench``: ivclip's ring against memcpy and the transports a user would pick instead.

Modules:

* :mod:`bench.harness` -- the workload (identical for every transport), the
  producer/consumer processes, timing and verification;
* :mod:`bench.transports` -- one small class per transport;
* :mod:`bench.copies` -- copy strategies measured inside the ring's own C copy path;
* :mod:`bench.idle` -- what the adaptive backoff costs when nothing happens;
* :mod:`bench.gesture` -- copy gesture to paste delivered, through a real broker;
* :mod:`bench.report` -- the table, the JSON rows and the plot;
* ``bench/test_micro.py`` -- pytest-benchmark micro-benchmarks
  (``pytest bench/ --benchmark-only``), outside the normal test run.
"""
