"""Guarded canary rollouts: steps and limits (``policy``), the statistics every process
adds to Redis (``stats``), the single controller that promotes or rolls back
(``controller``) and its actions on the routing state (``routing``).
"""
