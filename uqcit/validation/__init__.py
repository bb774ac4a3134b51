"""Validation: the claims of the source documents measured against the benchmark records.

``report`` builds the claims report (``uqcit report``), ``rules`` the selectors, figure
expressions and verdict rules it reads from ``claims.json``, ``figures`` the plotly figure of each
claim, ``samples`` the greedy generation samples side by side (and their HTML in the report),
``concentration`` the binary-concentration check of an exported package, ``multimodal`` the
structural run on image and audio models, ``humaneval`` the code-capability harness. A layer above
the stages and packages, beside the pipeline.
"""
