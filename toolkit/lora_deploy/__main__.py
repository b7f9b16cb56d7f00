"""python -m lora_deploy"""

from .cli import entry_point

entry_point()
