"""Whole runs: recipes (steps, options, gates), convert (a recipe from a model to a validated
artifact folder) and sweep (a grid of recipe variants, locally or on Ray)."""
