"""The run's concept layers checked before anything is written: an unknown layer name, a maps layer that is not
one of them or more maps than it has channels is one RunError listing what is valid."""
from __future__ import annotations

import warnings

from export.concepts import ConceptOutputs
from lrp_module import LRPModel
from lrp_module.concepts import ConceptError
from lrp_module.zoo import build_model

from ..artifact_cache import concept_request, is_cached
from ..config import RunConfig
from ..errors import RunError


def check_concept_layers(config: RunConfig, weights: str) -> None:
    """Nothing to do without concepts or when the run's artifact is cached (its build checked them); else the
    model's graph is built (weights `weights`) and the request resolved against it."""
    request = concept_request(config)
    if request is None or is_cached(config, weights):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights warn; the run warns about them itself
        model, _ = build_model(config.model, weights)
    try:
        ConceptOutputs(LRPModel(model, config.composite, top_k=config.top_k), request)
    except ConceptError as error:
        raise RunError(f"concepts: {error}") from None
