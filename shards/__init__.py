"""Shards: N ``oms serve`` processes behind one front (docs/scaling.md).

This package is the application layer around whole service processes: it
talks to each shard only over the shard's wire endpoints.
"""
