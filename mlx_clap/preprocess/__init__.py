"""Inputs to model inputs: audio decoding, the mel frontends, the tokenizers."""
