"""The lab layer of UQCIT Workbench (ipywidgets + plotly); holds no compression logic."""
