"""Pixel-BERT Flax models: the CNN (resnet.py), BERT (bert.py), the encoder that joins them (pixel_bert.py),
the task heads (heads.py), named sizes (presets.py) and `build.build_model(model_config, task)`.

Nothing is imported here, so that configs can use `presets` without loading JAX.
"""
