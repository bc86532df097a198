"""Per-example teacher routing (multi-teacher ExOPD: each example names the domain expert that scores it)."""

from __future__ import annotations

import torch

from ..models.rollouts import Rollouts
from .base import HiddenStates, StatelessTeacher, Teacher


class RoutedTeacher(StatelessTeacher):
    """Per-example routing to one of several teachers (multi-teacher ExOPD); rows without a route use ``default``.

    Sampled-token log-probs only: the methods that accept routes (``Needs.routable``) use nothing else.
    """

    def __init__(self, routes: dict[str, Teacher], default: Teacher | None = None):
        self.routes = routes
        self.default = default

    def _teacher(self, route: str | None) -> Teacher:
        if route is None:
            if self.default is None:
                raise ValueError("an example names no teacher route and teacher.path (the default teacher) is not set")
            return self.default
        if route not in self.routes:
            raise ValueError(f"an example routes to teacher '{route}' but teacher.routes has: {', '.join(sorted(self.routes))}")
        return self.routes[route]

    def token_logprobs(self, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:
        routes = rollouts.route_B or [None] * rollouts.batch_size
        logp_BC = torch.zeros(rollouts.completion_ids_BC.shape, dtype=torch.float32, device=rollouts.completion_ids_BC.device)
        for route in dict.fromkeys(routes):
            rows = [i for i, r in enumerate(routes) if r == route]
            logp_BC[rows] = self._teacher(route).token_logprobs(rollouts.select(rows), temperature).to(logp_BC.dtype)
        return logp_BC

    def take_failure(self) -> Exception | None:
        failures = [t.take_failure() for t in [*self.routes.values(), self.default] if t is not None]
        return next((f for f in failures if f is not None), None)

    def distributions(self, rollouts: Rollouts) -> HiddenStates:
        raise TypeError("routed teachers give sampled-token log-probs only, not full next-token distributions")
