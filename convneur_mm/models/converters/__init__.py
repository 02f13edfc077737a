"""Checkpoint conversions from other models' layouts into ConvNeur's.

A conversion maps a source state dict onto a target's state dict, which the
caller builds (``tools/model_converters/``), as timm's
``checkpoint_filter_fn(state_dict, model)`` does: nothing here builds a model.
"""
