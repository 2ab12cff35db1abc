"""Drift monitoring: live features and scores against each version's reference profile."""
