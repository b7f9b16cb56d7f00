"""lora-deploy: from a PEFT LoRA adapter on disk to a served, smoke-tested vLLM deployment.

The library is importable without torch being imported: heavy modules load lazily.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("lora-deploy")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from lora_deploy.errors import LoraDeployError

__all__ = ["LoraDeployError", "__version__"]
