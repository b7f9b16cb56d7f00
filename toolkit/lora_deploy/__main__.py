"""python -m lora_deploy"""

from .cli import main

main()
