"""Semantic-aware layer freezing: where training pays off, and what it costs.

``analysis.py`` reads each layer through the model's own head (logit lens) and chooses how
many layers to freeze; ``freezing.py`` freezes them so backpropagation stops there;
``plan.py`` estimates memory and step time per method and frozen depth, and picks one under
a budget.
"""
