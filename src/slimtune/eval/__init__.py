"""The evaluation stage: quality, inference cost, A/B statistics and reports.

``evaluate.py`` (loss, accuracy, exact match, decode latency), ``cost.py`` (peak memory,
percentiles, byte sizes), ``abtest.py`` (paired bootstrap, McNemar), ``report.py``
(tables, JSON, markdown, plots).
"""
