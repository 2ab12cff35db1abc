"""Reason codes from the model that scored: exact TreeSHAP over the ONNX graph's trees.

``trees``: the ONNX tree ensemble as node arrays; ``paths``: its leaves as TreeSHAP
path games; ``treeshap``: vectorised exact TreeSHAP over them (``subsets``: a
precomputed table per path, ``polynomial``: the long paths); ``artifact``: the
checksummed ``explainer.json`` training writes beside ``model.onnx``
(:func:`~server.explain.artifact.write_explainer`); ``explainer``: load, verify and
prove it against the model; ``reasons``: the reason-code catalogue
and top-N ranking.
"""
