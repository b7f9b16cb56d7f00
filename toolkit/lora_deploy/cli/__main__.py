"""python -m lora_deploy.cli"""

from . import main

main()
