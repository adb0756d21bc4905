"""Preference tuning (DPO, KTO, ORPO through TRL): the recipe (recipe.py), preference pairs (data.py), held-out pair
and answer metrics (metrics.py), and on-policy pairs built from the model's own answers (onpolicy.py)."""
