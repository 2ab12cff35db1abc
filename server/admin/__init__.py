"""The authenticated ``streamscore.v1.Admin`` gRPC service (``api``), its credential
check (``auth``) and the ``streamscore models`` commands that call it (``cli``).
"""
