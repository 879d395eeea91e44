"""Online features for factory logs, carried per entity (river underneath)."""

from features.builder import FeatureBatch, build_features
from features.spec import FeatureSpec
from features.state import EntityFeatureState, FeatureStateError, LineFeatureStates

__all__ = [
    "EntityFeatureState",
    "FeatureBatch",
    "FeatureSpec",
    "FeatureStateError",
    "LineFeatureStates",
    "build_features",
]
