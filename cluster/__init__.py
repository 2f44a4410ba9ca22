"""Cluster shapes: the topology (cloud + edge sites), a local multi-node launcher, connecting.

``topology`` (what a cluster holds), ``settings`` (the Ray settings edgemeta applies),
``connect`` (join or start Ray as a driver), ``local`` (the multi-node launcher's commands) over
``nodes`` (one ``ray start`` each) and ``state`` (what was started, in the state folder),
``cloud_config`` (``cluster.yaml``), ``auth`` (tokens), and three leaf helpers, ``procs``
(``/proc``), ``ports`` and ``console``. Keep this file free of imports: Flower's virtualenv
imports ``cluster.procs`` for the benchmarks.
"""
