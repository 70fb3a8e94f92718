"""Recipes: the typed recipe schema, its loader and the `moetune` command line."""
