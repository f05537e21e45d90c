"""Observability: training audit (hooks and traces: issue #6)."""
