"""Resilience figures of issue 10: fuzz (and later overload, chaos) against a live server."""
