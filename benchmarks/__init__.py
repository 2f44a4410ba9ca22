"""Benchmarks, run from the repository root as ``python -m benchmarks.NAME`` (results and the
exact commands in docs/BENCHMARKS.md). A package so that the serving benchmarks share
:mod:`benchmarks.serving_rig` and :mod:`benchmarks.http_load` by import; not installed with
edgemeta. Keep this file free of imports: Flower's virtualenv imports :mod:`benchmarks.peers`.
"""
