"""python -m lora_deploy.cli"""

from . import entry_point

entry_point()
