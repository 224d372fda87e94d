"""The one error type of the data pipeline."""


class DataError(ValueError):
    """A data problem (source, tokenizer, corpus size, ...); the one-line message names it."""
