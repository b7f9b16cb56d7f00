"""python -m lora_deploy.cli"""

from lora_deploy.cli import entry_point

entry_point()
