"""What only makes sense on the synthetic world (the README's demo), kept out of the product's core.

`warm_start.py`: the CNN warm start, an init hook (init_hooks.py) that the demo configs name in
`config.init_hook`. `grounding.py`: the grounding check of the attention maps against the world's ground
truth (`python -m pixelbert_jax.demo.grounding`). No module outside this package imports it
(tests/test_imports.py).
"""
