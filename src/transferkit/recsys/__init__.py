"""Recommendation: interactions, two-tower / matrix-factorisation models, ranking metrics and transfer by id."""
