"""Policies by name. One small file each; see ``base.Policy``."""

from __future__ import annotations

from .base import Policy, Summaries

POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    POLICIES[cls.name] = cls
    return cls


def get_policy(policy: "str | Policy", **params) -> Policy:
    if isinstance(policy, Policy):
        return policy
    try:
        cls = POLICIES[policy]
    except KeyError:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(sorted(POLICIES))}") from None
    return cls(**params)


from . import exact, h2o, hybrid, lru, quest, sketch, snapkv, streaming  # noqa: E402,F401  (register the built-ins)

__all__ = ["Policy", "Summaries", "POLICIES", "register", "get_policy"]
