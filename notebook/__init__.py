"""A run where a researcher works: in a Jupyter notebook.

`inline`: one token's map as an object that Jupyter renders (`AttentionRun.show`); `explorer`: the token
strip and the layer and head ranges, live (`AttentionRun.explore`): an ipywidgets panel computed in the
kernel, or, without ipywidgets, a self-contained HTML view that recomputes the map in the page.
"""
