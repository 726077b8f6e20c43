"""Showing results.

- ``style``    how figures look: the shared style, colours per method
- ``figures``  figures (plotly), one function per view
- ``maps``     latent maps framed on an edit: reference facts, arrows per edit
- ``replay``   figures that need the model: a run's edits applied again
- ``widgets``  ipywidgets panels for notebooks
- ``demo``     the demo: a few edits with ROME and STEAM-ROME, and where each lives
"""
