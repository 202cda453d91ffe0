"""Capabilities: what an agent may do, scoped to resources, with optional constraints.

A capability list allows an action when at least one capability allows it; an empty list
allows nothing. ``is_subset_of`` is the attenuation rule for sub-delegation: a child may
only narrow what its parent allows, so everything the child allows the parent allows too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from ._types import Amount, Currency, Identifier, ResourceName, ResourcePattern

__all__ = [
    "Action",
    "AnyCapability",
    "Capability",
    "Custom",
    "Read",
    "Transact",
    "Write",
    "allowing_capability",
    "capabilities_subset",
    "parse_capabilities",
    "pattern_covers",
    "pattern_matches",
]

Kind = Literal["read", "write", "transact", "custom"]


def pattern_matches(pattern: str, resource: str) -> bool:
    """Whether a concrete resource falls under a pattern."""
    if pattern == "*":
        return True
    if pattern.endswith("/*"):
        return resource.startswith(pattern[:-1])
    return resource == pattern


def pattern_covers(parent: str, child: str) -> bool:
    """Whether every resource ``child`` matches is also matched by ``parent``."""
    if child == "*":
        return parent == "*"
    if child.endswith("/*"):
        prefix = child[:-1]
        return parent == "*" or (parent.endswith("/*") and prefix.startswith(parent[:-1]))
    return pattern_matches(parent, child)


class Action(BaseModel):
    """One attempted action, as a provider describes it to the verifier."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind
    resource: ResourceName
    name: Identifier | None = Field(None, description="The custom capability's name.")
    amount: Amount | None = Field(None, description="Transaction amount (transact only).")
    currency: Currency | None = None
    payee: Identifier | None = None
    filter: str | None = Field(
        None, max_length=512, description="The read filter the provider applies, if any."
    )

    @model_validator(mode="after")
    def _shape(self) -> Action:
        if self.kind == "custom" and self.name is None:
            raise ValueError("a custom action needs a name")
        if self.kind != "custom" and self.name is not None:
            raise ValueError("only custom actions have a name")
        if self.kind == "transact":
            if self.amount is None or self.currency is None:
                raise ValueError("a transaction needs an amount and a currency")
        elif self.amount is not None or self.currency is not None or self.payee is not None:
            raise ValueError("only transactions carry an amount, currency or payee")
        return self


class Capability(BaseModel):
    """Base of the four capability kinds; build them with ``Capability.read(...)`` etc."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind
    resource: ResourcePattern

    # Named constructors, as the SDK examples use them.
    @staticmethod
    def read(resource: str, *, filter: str | None = None) -> Read:
        return Read(resource=resource, filter=filter)

    @staticmethod
    def write(resource: str) -> Write:
        return Write(resource=resource)

    @staticmethod
    def transact(
        resource: str,
        *,
        max_amount: Decimal | int | str | None = None,
        currency: str | None = None,
        payees: Iterable[str] | None = None,
    ) -> Transact:
        return Transact.model_validate(
            {
                "resource": resource,
                # Python callers may pass an int; the wire form is a decimal string.
                "max_amount": str(max_amount) if isinstance(max_amount, int) else max_amount,
                "currency": currency,
                # A str is an Iterable[str] too: tuple("acme") made payees a, c, e and m.
                # Passed on as it is, it is refused as a document's "payees": "acme" is.
                "payees": payees if payees is None or isinstance(payees, str) else tuple(payees),
            }
        )

    @staticmethod
    def custom(name: str, resource: str) -> Custom:
        return Custom(name=name, resource=resource)

    def allows(self, action: Action) -> bool:
        return action.kind == self.kind and pattern_matches(self.resource, action.resource)

    def is_subset_of(self, parent: Capability) -> bool:
        return type(parent) is type(self) and pattern_covers(parent.resource, self.resource)

    def to_document(self) -> dict[str, Any]:
        """The JSON form used in grants and tokens (absent constraints are omitted)."""
        return self.model_dump(mode="json", exclude_none=True)


class Read(Capability):
    kind: Literal["read"] = "read"
    # Filters are opaque to AgentAuth (the provider applies them), so the only safe subset
    # rule is equality, and an action must declare the filter it is applying.
    filter: str | None = Field(None, min_length=1, max_length=512)

    def allows(self, action: Action) -> bool:
        return super().allows(action) and (self.filter is None or action.filter == self.filter)

    def is_subset_of(self, parent: Capability) -> bool:
        return (
            isinstance(parent, Read)
            and super().is_subset_of(parent)
            and (parent.filter is None or self.filter == parent.filter)
        )


class Write(Capability):
    kind: Literal["write"] = "write"


class Transact(Capability):
    kind: Literal["transact"] = "transact"
    max_amount: Amount | None = None
    currency: Currency | None = None
    payees: tuple[Identifier, ...] | None = Field(
        None, min_length=1, max_length=256, description="If set, the only allowed payees."
    )

    @field_validator("payees")
    @classmethod
    def _sorted_payees(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        # One order, so equal capabilities hash equally in a grant.
        return None if value is None else tuple(sorted(set(value)))

    @model_validator(mode="after")
    def _money(self) -> Transact:
        if (self.max_amount is None) != (self.currency is None):
            raise ValueError("max_amount and currency go together")
        return self

    def allows(self, action: Action) -> bool:
        if not super().allows(action) or action.amount is None:
            return False
        if self.max_amount is not None and (
            action.currency != self.currency or action.amount > self.max_amount
        ):
            return False
        return self.payees is None or action.payee in self.payees

    def is_subset_of(self, parent: Capability) -> bool:
        if not super().is_subset_of(parent) or not isinstance(parent, Transact):
            return False
        if parent.max_amount is not None and (
            self.max_amount is None
            or self.currency != parent.currency
            or self.max_amount > parent.max_amount
        ):
            return False
        return parent.payees is None or (
            self.payees is not None and set(self.payees) <= set(parent.payees)
        )


class Custom(Capability):
    kind: Literal["custom"] = "custom"
    name: Identifier

    def allows(self, action: Action) -> bool:
        return super().allows(action) and action.name == self.name

    def is_subset_of(self, parent: Capability) -> bool:
        return (
            isinstance(parent, Custom) and super().is_subset_of(parent) and parent.name == self.name
        )


AnyCapability = Annotated[Read | Write | Transact | Custom, Field(discriminator="kind")]
_CAPABILITIES: TypeAdapter[tuple[AnyCapability, ...]] = TypeAdapter(tuple[AnyCapability, ...])


def parse_capabilities(documents: object) -> tuple[Capability, ...]:
    """Validate a JSON list of capability documents (raises pydantic ValidationError)."""
    return _CAPABILITIES.validate_python(documents)


def allowing_capability(capabilities: Sequence[Capability], action: Action) -> Capability | None:
    """The first capability that allows ``action``, or None. Empty allows nothing."""
    for capability in capabilities:
        if capability.allows(action):
            return capability
    return None


def capabilities_subset(child: Sequence[Capability], parent: Sequence[Capability]) -> bool:
    """Whether ``child`` is an attenuation of ``parent``: each child capability is covered."""
    return all(any(c.is_subset_of(p) for p in parent) for c in child)
