"""The prompts that checks use when the user gives none: one place, torch-free (it ships to the smoke Job's pod).

The smoke test, the benchmark, the runtime-adapter probe, the merge's quality and verify checks and the deploy
spec's ``smokeTest.prompt`` all start from :data:`DEFAULT_PROMPT`, so a number from one can be read beside another.
"""

DEFAULT_PROMPT = "Customer: I lost my password.\nAgent:"
# the merge's logit checks add two general prompts, so an adapter trained on one task is compared off it too
CHECK_PROMPTS = (DEFAULT_PROMPT, "The quick brown fox", "Hello, how are you today?")
