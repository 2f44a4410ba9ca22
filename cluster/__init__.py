"""Cluster shapes: the topology (cloud + edge sites), a local multi-node launcher, connecting."""
