"""Model routing: PHI never reaches the cloud, in any configuration, first choice or fallback."""

from __future__ import annotations

import itertools

import pytest

from services.rag.routing import ModelKind, plan_routes


@pytest.mark.parametrize(("cloud", "local"), list(itertools.product([False, True], repeat=2)))
def test_phi_never_routes_to_the_cloud(cloud: bool, local: bool) -> None:
    routes = plan_routes(phi_present=True, cloud_configured=cloud, local_configured=local)
    assert ModelKind.CLOUD not in [r.kind for r in routes]
    assert routes[-1].kind is ModelKind.EXTRACTIVE
    assert routes[0].kind is (ModelKind.LOCAL if local else ModelKind.EXTRACTIVE)
    assert all(r.reason.startswith("phi_present") for r in routes)


def test_without_phi_cloud_then_local_then_extractive() -> None:
    routes = plan_routes(phi_present=False, cloud_configured=True, local_configured=True)
    assert [r.kind for r in routes] == [ModelKind.CLOUD, ModelKind.LOCAL, ModelKind.EXTRACTIVE]
    assert [r.reason for r in routes] == [
        "no_phi_cloud_model", "no_phi_cloud_unavailable_local_model", "no_phi_models_unavailable_extractive"
    ]  # fmt: skip
    assert plan_routes(False, False, True)[0].reason == "no_phi_no_cloud_local_model"
    assert [r.reason for r in plan_routes(False, False, False)] == ["no_phi_no_model_extractive"]


@pytest.mark.parametrize(("cloud", "local"), list(itertools.product([False, True], repeat=2)))
def test_text_that_could_hide_names_never_routes_to_the_cloud(cloud: bool, local: bool) -> None:
    routes = plan_routes(phi_present=False, cloud_configured=cloud, local_configured=local, names_checkable=False)
    assert ModelKind.CLOUD not in [r.kind for r in routes]
    assert all(r.reason.startswith("names_unverifiable") for r in routes)


def test_lower_case_transcripts_are_not_name_checkable() -> None:
    from services.rag.phi import names_checkable

    assert not names_checkable("john smith has chest pain what should i give him")
    assert names_checkable("John Smith has chest pain")
    assert names_checkable("What is the dose of Ativan?")
    assert names_checkable("ok thanks")  # too short to hide a name
