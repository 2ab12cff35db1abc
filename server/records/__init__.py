"""What the server writes beside its answers: shadow comparisons (``shadow``), the
sampled traffic log (``traffic_log``) and the bounded Kafka sink both use
(``kafka_sink``). Replaying a recorded log is a client tool: ``server.clients.replay``.
"""
