"""The server-wide speculation settings, changed at run time through Admin.SetPolicy."""

from __future__ import annotations

from dataclasses import dataclass

from api.speculation import SpeculationMode
from server.errors import InvalidArgumentError


@dataclass(frozen=True, slots=True)
class PolicySettings:
    mode: SpeculationMode  # AUTO, OFF or FIXED: what requests that do not choose get
    num_draft_tokens: int  # k for FIXED
    max_draft_tokens: int  # no request ever drafts more
    drafter: str = ""  # who drafts for FIXED; "" is the engine's first drafter

    def validated(self, engine_max_draft_tokens: int, drafters: tuple[str, ...]) -> PolicySettings:
        """Returns self, or raises InvalidArgumentError naming the bad field."""
        if self.drafter and self.drafter not in drafters:
            raise InvalidArgumentError(
                "policy.drafter", f"unknown drafter {self.drafter!r}; this server has {', '.join(drafters) or 'none'}"
            )
        if self.mode not in (SpeculationMode.AUTO, SpeculationMode.OFF, SpeculationMode.FIXED):
            raise InvalidArgumentError("policy.mode", f"must be AUTO, OFF or FIXED, got {int(self.mode)}")
        if not 0 <= self.max_draft_tokens <= engine_max_draft_tokens:
            raise InvalidArgumentError(
                "policy.max_draft_tokens",
                f"must be in [0, {engine_max_draft_tokens}] (the engine's limit), got {self.max_draft_tokens}",
            )
        if not 0 <= self.num_draft_tokens <= self.max_draft_tokens:
            raise InvalidArgumentError(
                "policy.num_draft_tokens",
                f"must be in [0, max_draft_tokens={self.max_draft_tokens}], got {self.num_draft_tokens}",
            )
        return self


@dataclass(frozen=True, slots=True)
class PolicyUpdate:
    """What a SetPolicy call changes; None keeps the current value."""

    mode: SpeculationMode | None = None
    num_draft_tokens: int | None = None
    max_draft_tokens: int | None = None
    drafter: str | None = None

    def applied_to(self, current: PolicySettings) -> PolicySettings:
        return PolicySettings(
            mode=current.mode if self.mode is None else self.mode,
            num_draft_tokens=current.num_draft_tokens if self.num_draft_tokens is None else self.num_draft_tokens,
            max_draft_tokens=current.max_draft_tokens if self.max_draft_tokens is None else self.max_draft_tokens,
            drafter=current.drafter if self.drafter is None else self.drafter,
        )
