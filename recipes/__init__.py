"""Recipes and the `moetune` command line: YAML recipes (shipped as package data) composed
into the typed sections of moetune.config (`loader`), `moetune run` (`run`), and the
subcommands that compose runs from flags (`evaluate`, `held_out`, `plan`, `demo`).

The top layer: it imports the library, and nothing in the library imports it.
"""
