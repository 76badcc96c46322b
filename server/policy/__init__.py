"""Speculation policies: how many draft tokens each running request proposes per step."""

from server.policy.settings import PolicySettings, PolicyUpdate
from server.policy.snapshot import PolicySnapshot
from server.policy.speculation import SpeculationPolicy

__all__ = ["PolicySettings", "PolicySnapshot", "PolicyUpdate", "SpeculationPolicy"]
