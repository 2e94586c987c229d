"""Genome codecs: a point of the unit cube <-> a recipe, one codec a space kind."""
