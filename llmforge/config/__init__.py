"""Recipes: typed dataclasses, YAML loading with extends and --set, DeepSpeed config composition."""

from llmforge.config.loader import load_recipe, recipe_from_dict, recipe_to_dict, recipe_to_yaml
from llmforge.config.recipe import (
    ActivationCheckpointingConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    Recipe,
    TrainConfig,
)

__all__ = [
    "load_recipe",
    "recipe_from_dict",
    "recipe_to_dict",
    "recipe_to_yaml",
    "Recipe",
    "ModelConfig",
    "TrainConfig",
    "DataConfig",
    "ActivationCheckpointingConfig",
    "ConfigError",
]
