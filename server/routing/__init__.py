"""Routing state: which versions serve a model and in what shares, and how it changes.

``state`` is the persisted document and its transitions, ``store`` keeps it (Redis hash
with compare-and-set and an audit stream, or a file), ``control`` applies audited
changes and keeps every process's router in step. ``server.router`` chooses per
request from it.
"""
