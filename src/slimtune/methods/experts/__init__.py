"""Routed expert adapters (conditional computation): see ``method.py`` for the math.

``routing.py`` chooses each token's experts, ``layer.py`` runs them on an adapted linear,
``cuda_kernel.py`` / ``cpu_kernel.py`` (+ ``cpu_kernel.c``) are the fused inference kernels.
"""

from .layer import ExpertLinear
from .method import (
    EXPERTS_FILE,
    ExpertsMethod,
    ExpertsOptions,
    adapter_parameter_counts,
    attach_experts,
    attached,
    center_routers,
    expert_usage,
    load_experts,
)
from .routing import ExpertRouter, load_balancing_loss

__all__ = [
    "EXPERTS_FILE",
    "ExpertLinear",
    "ExpertRouter",
    "ExpertsMethod",
    "ExpertsOptions",
    "adapter_parameter_counts",
    "attach_experts",
    "attached",
    "center_routers",
    "expert_usage",
    "load_balancing_loss",
    "load_experts",
]
