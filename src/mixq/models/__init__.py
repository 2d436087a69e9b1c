"""mixq.models: the only code that knows architectures."""

from mixq.models.enumerate import cnn_units, llm_units
from mixq.models.load import DEFAULT_MODEL, MODELS, LoadedModel, load_model
from mixq.models.units import Unit, get_weight, set_weight

__all__ = ["DEFAULT_MODEL", "MODELS", "LoadedModel", "Unit", "cnn_units", "get_weight", "llm_units",
           "load_model", "set_weight"]
