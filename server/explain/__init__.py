"""Reason codes from the model that scored: exact TreeSHAP over the ONNX graph's trees.

``trees``: the ONNX tree ensemble as node arrays; ``treeshap``: vectorised exact
TreeSHAP; ``artifact``: the checksummed ``explainer.json`` training writes beside
``model.onnx`` (:func:`~server.explain.artifact.write_explainer`); ``explainer``:
load, verify and prove it against the model; ``reasons``: the reason-code catalogue
and top-N ranking.
"""
