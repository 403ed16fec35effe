"""SAE architectures (a registry), checkpoint formats and sparse kernels.

Importing the package registers every built-in architecture; a new built-in is a module here plus its line below
(README, "Extending saelab").
"""

from saelab.sae import jumprelu, relu, topk

__all__ = ["jumprelu", "relu", "topk"]
