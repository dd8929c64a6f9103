"""The errors emloc raises on bad input, in a module that imports nothing: a command line can name
them without loading the model code (torch, transformers)."""


class UnsupportedModelError(ValueError):
    """The model's family has no adapter."""


class InputError(ValueError):
    """A chunk of frames or a question cannot be used; the message says why."""
