"""Per-example teacher routing (multi-teacher ExOPD: each example names the domain expert that scores it)."""

from __future__ import annotations

import torch

from ..models.rollouts import Rollouts
from .base import HiddenStates, StatelessTeacher, Teacher
from .cross_tokenizer import SpanScores


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

    @property
    def reads_text(self) -> bool:
        """Every route reads the completions as text in a tokenizer of its own (``teacher.tokenizer: own``)."""
        teachers = [*self.routes.values(), *([self.default] if self.default is not None else [])]
        return bool(teachers) and all(t.reads_text for t in teachers)

    def span_scores(self, rollouts: Rollouts, examples, temperature: float = 1.0):
        """Each route's spans and span log-probs on its own rows (``CrossTokenizerTeacher.span_scores``), in the batch's
        row order."""
        routes = rollouts.route_B or [None] * rollouts.batch_size
        parts = []
        for route in dict.fromkeys(routes):
            rows = [i for i, r in enumerate(routes) if r == route]
            parts.append((rows, self._teacher(route).span_scores(rollouts.select(rows), [examples[i] for i in rows], temperature)))
        first = parts[0][1]
        merged = [torch.empty((rollouts.batch_size, *t.shape[1:]), dtype=t.dtype, device=t.device)
                  for t in (first.teacher_logp_BC, first.last_BC, first.end_BC)]
        for rows, scores in parts:
            index = torch.tensor(rows, device=first.end_BC.device)
            for whole, part in zip(merged, (scores.teacher_logp_BC, scores.last_BC, scores.end_BC)):
                whole[index] = part.to(whole.dtype)
        return SpanScores(*merged, sum(scores.cut_tokens for _, scores in parts))

    def take_failure(self) -> Exception | None:
        failures = [t.take_failure() for t in [*self.routes.values(), self.default] if t is not None]
        return next((f for f in failures if f is not None), None)

    def distributions(self, rollouts: Rollouts) -> HiddenStates:
        raise TypeError("routed teachers give sampled-token log-probs only, not full next-token distributions")
