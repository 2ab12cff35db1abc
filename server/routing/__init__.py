"""Routing state: which versions serve a model and in what shares, and how it changes.

``state`` is the persisted document and its transitions, ``store`` keeps it (Redis hash
with compare-and-set and an audit stream, or a file), ``sync`` keeps every process's
loaded versions and router in step with it, ``changes`` makes audited changes to it.
``server.router`` chooses per request from it.
"""
