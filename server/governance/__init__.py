"""Model governance: validation report, model card and reference profile of a version."""
