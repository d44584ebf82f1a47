"""renyi-lora: ensembles of K LoRA adapters on one frozen LM, trained jointly with an alpha-Renyi objective."""

from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.objective import gaussian_prior, renyi_loss, renyi_per_example, responsibilities, routed_loss

__version__ = "0.1.0"

__all__ = ["EnsembleConfig", "LoraEnsemble", "gaussian_prior", "renyi_loss", "renyi_per_example", "responsibilities",
           "routed_loss", "__version__"]
