"""saelab: sparse-autoencoder interpretability of language models, end to end.

Stages (one module each): models -> data -> activations (collect) -> train -> evaluate -> latents (cache)
-> sampling -> explain -> score -> report. Run them all with `saelab demo`, or one at a time with
`saelab collect|train|eval|cache|sample|explain|score|report --run-dir RUN`.
"""

__version__ = "0.1.0"
