"""python -m lora_deploy"""

from lora_deploy.cli import entry_point

entry_point()
