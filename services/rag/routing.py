"""Model routing: which model may see a question. The one hard rule: a question with PHI (in its text or its
clinical context) never reaches the cloud model, whatever is configured and whatever fails."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ModelKind(StrEnum):
    """Where an answer is written."""

    CLOUD = "cloud"  # a hosted model outside our network
    LOCAL = "local"  # a model on our own network
    EXTRACTIVE = "extractive"  # no model: sentences quoted from the knowledge base


@dataclass(frozen=True)
class Route:
    """One candidate model and the rule that picked it."""

    kind: ModelKind
    reason: str


def plan_routes(
    phi_present: bool, cloud_configured: bool, local_configured: bool, names_checkable: bool = True
) -> list[Route]:
    """The models to try, in order: the first is the rule's choice, the rest are fallbacks for when it cannot start
    an answer. The extractive generator always ends the list (it needs nothing and cannot be down).

    `names_checkable` is False for text the detector cannot clear of names (a lower-case speech transcript: the
    name model needs capitals). Such a question is kept from the cloud as if it held PHI, under its own reason."""
    if phi_present or not names_checkable:
        rule = "phi_present" if phi_present else "names_unverifiable"
        if local_configured:
            return [
                Route(ModelKind.LOCAL, f"{rule}_local_model"),
                Route(ModelKind.EXTRACTIVE, f"{rule}_local_unavailable_extractive"),
            ]
        return [Route(ModelKind.EXTRACTIVE, f"{rule}_no_local_model_extractive")]
    routes = []
    if cloud_configured:
        routes.append(Route(ModelKind.CLOUD, "no_phi_cloud_model"))
    if local_configured:
        reason = "no_phi_cloud_unavailable_local_model" if cloud_configured else "no_phi_no_cloud_local_model"
        routes.append(Route(ModelKind.LOCAL, reason))
    reason = "no_phi_models_unavailable_extractive" if routes else "no_phi_no_model_extractive"
    routes.append(Route(ModelKind.EXTRACTIVE, reason))
    return routes
