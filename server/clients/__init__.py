"""Client tools that call a running server rather than serve: ``replay`` of recorded
traffic against a server/version, and the HDR latency ``histogram`` it reports with
(the bench load generator uses the same one).
"""
