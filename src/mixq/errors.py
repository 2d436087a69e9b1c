"""Typed exceptions. Library code raises these with a message that names the bad input and
what was expected; the command line prints the message and exits non-zero."""


class MixqError(Exception):
    """Base class of every error mixq raises on purpose."""


class FormatError(MixqError, ValueError):
    """An unknown or malformed format spec, or a format that cannot apply to a tensor."""


class NotFoundError(MixqError, FileNotFoundError):
    """A model, data file or package that is missing; the message says where mixq looked."""


class ArtifactError(MixqError, ValueError):
    """An artifact (sensitivity.json, plan.json, checkpoint) that is damaged, of another
    schema version, or made for another model."""


class DataError(MixqError, ValueError):
    """Bad weights or data: NaN/inf values, too few tokens for the windows asked for."""


class BudgetError(MixqError, ValueError):
    """A budget no plan can meet; the message gives the achievable range."""


class ExportError(MixqError, ValueError):
    """A checkpoint or plan that a target format (compressed-tensors, GGUF) cannot hold; the
    message names the units and says why."""


class UnsupportedModelError(MixqError, ValueError):
    """A model mixq cannot quantize (an encoder, an encoder-decoder, a vision transformer):
    the message names its class and what is supported."""
