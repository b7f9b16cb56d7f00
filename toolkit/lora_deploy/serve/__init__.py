"""One vLLM server and its clients.

- :mod:`.flags`: the one builder of vLLM arguments and environment (the launcher, the manifests and ``plan``
  all call it), vLLM's dtype and LoRA-rank rules, served-name rules;
- :mod:`.preflight`: rules over typed adapter settings plus the installed vLLM's own validation;
- :mod:`.launcher`: vLLM as a child process group; :mod:`.admin`: runtime adapters;
- :mod:`.client`: the one OpenAI-endpoint client; :mod:`.smoke`: logprob verdicts; :mod:`.bench`: load;
- :mod:`.flows`: what ``dynamic`` and ``merged --serve`` decide before anything starts.

:mod:`.client` and :mod:`.smoke` (with :mod:`lora_deploy.errors`) are torch-free and ship to pods in the smoke
Job's ConfigMap, so this file stays empty of imports.
"""
