"""Integrations of CAPO with training frameworks; each module is the only place that imports its
framework (``curvopt.integrations.trl``: TRL's ``GRPOTrainer``)."""
