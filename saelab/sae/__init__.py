"""SAE architectures (a registry), checkpoint formats and sparse kernels.

Importing the package registers every built-in architecture; a new built-in is a module here plus its import line
below (README, "Extending saelab"). The registration order is the order `--train.architecture` lists them in.
"""

# isort: off
from saelab.sae import topk
from saelab.sae import relu
from saelab.sae import jumprelu

# isort: on

__all__ = ["jumprelu", "relu", "topk"]
