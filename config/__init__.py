"""Typed configuration: the dataclass sections a recipe is made of (`schema`) and the
mapping -> dataclass builder whose `RecipeError`s name the key path (`build`).

The bottom layer: plain data that imports nothing else of moetune, so every layer above
takes its settings as these types and a recipe is checked before anything heavy loads.
"""
