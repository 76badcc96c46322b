"""Speculation policies: how many draft tokens each running request proposes per step."""

from server.policy.settings import PolicySettings
from server.policy.speculation import SpeculationPolicy

__all__ = ["PolicySettings", "SpeculationPolicy"]
