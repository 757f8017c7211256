"""Concepts over a dataset (CRP): relevance maximisation and statistics per channel, merged across shards and
actors (relmax.py)."""
