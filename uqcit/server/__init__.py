"""The REST API server (``uqcit serve``): compression jobs over HTTP, run by the CLI's ``run_job``.

Top layer, beside ``uqcit.cli`` and the widgets: it imports the pipeline, recipes and packages;
nothing below imports it. Its modules: ``app`` (endpoints), ``schemas`` (bodies), ``checks``
(what a request may ask), ``jobs`` (queue and job processes), ``worker`` (one job), ``db``
(SQLite records), ``auth`` (API keys), ``uploads``, ``limits``, ``settings``, ``commands``
(the CLI's serve/serve-key). FastAPI and uvicorn come with the ``server`` extra; importing this
package needs neither.
"""
