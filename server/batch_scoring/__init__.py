"""``streamscore score-batch``: score a spine offline with the served model and features.

spine.py      reading and checking the spine in chunks (ids, times, ``--as-of``)
features.py   feature values per chunk: point-in-time (the backfill's code) or online
online.py     the one adapter onto the server's Redis feature assembly (``--features online``)
scoring.py    the checked ONNX artifact (server.runtime), decisions, reasons
chunk.py      one chunk: features -> scores -> output columns (every engine runs this)
compare.py    ``--compare-version`` summary: agreement, score PSI, decision rates
output.py     the Parquet output: temporary name, lineage metadata, rename at the end
local.py      the local engine: worker processes over chunks, progress on stderr
spark.py      the Spark engine: the same chunk code in ``mapInPandas``
cli.py        the command line
"""
