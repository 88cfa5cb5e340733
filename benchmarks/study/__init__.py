"""Studies: longer, cached experiments whose results are committed and reported.

The TinyShakespeare learning-rate transfer study (``python -m
benchmarks.study.lr_transfer``; methods from :mod:`benchmarks.registry`):

* :mod:`~benchmarks.study.configs`: what a run is (its key), the grids and presets;
* :mod:`~benchmarks.study.planning`: which runs each section needs, from the results;
* :mod:`~benchmarks.study.store`: the results file (atomic, locked, kill-safe writes);
* :mod:`~benchmarks.study.version`: the code version each run records, and ``HEAD``'s;
* :mod:`~benchmarks.study.params` and :mod:`~benchmarks.study.training`: one run;
* :mod:`~benchmarks.study.lr_transfer`: the command line (resumable sweep);
* :mod:`~benchmarks.study.report` (with :mod:`~benchmarks.study.report_intro`,
  :mod:`~benchmarks.study.report_finetune`, :mod:`~benchmarks.study.report_long`,
  :mod:`~benchmarks.study.report_rule`, :mod:`~benchmarks.study.report_proxy`,
  :mod:`~benchmarks.study.report_long_study`, :mod:`~benchmarks.study.discussion`,
  :mod:`~benchmarks.study.figures`, :mod:`~benchmarks.study.aggregate`,
  :mod:`~benchmarks.study.transfer`, :mod:`~benchmarks.study.proxy_stats`,
  :mod:`~benchmarks.study.labels`): turns the cached results into
  ``docs/lr_transfer.md`` and the plots under ``docs/lr_transfer/``. Every report
  module imports the ones it needs at the top; none imports
  :mod:`~benchmarks.study.report` but for type hints (the test suite checks that the
  import graph has no cycle).
"""
