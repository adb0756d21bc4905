"""Supervised fine-tuning: the recipe (recipe.py: config -> data -> model -> train -> evaluate -> save), the Trainer
with answer-only loss, packing and shared-prefix batches (trainer.py), and curriculum stages (curriculum.py)."""
