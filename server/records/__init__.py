"""What the server writes beside its answers: shadow comparisons (``shadow``), the
sampled traffic log (``traffic_log``), the bounded Kafka sink both use
(``kafka_sink``), and ``replay`` of a recorded log against a server.
"""
