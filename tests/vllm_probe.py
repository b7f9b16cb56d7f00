"""Run real vLLM (CPU build) in this process on a model and print what it allocated, as JSON.

Usage: python tests/vllm_probe.py MODEL KV_SPACE_GIB DTYPE MAX_MODEL_LEN [MAX_LORAS MAX_LORA_RANK]
vLLM logs "KV cache size: N tokens" (the caller reads it from the output); this prints, as ``PROBE {json}``,
"lora_bytes": the bytes of every LoRA slot tensor in the engine's model (storage counted once). A separate
process per configuration: tests/test_plan.py.
"""

import json
import os
import sys

os.environ["VLLM_CPU_KVCACHE_SPACE"] = sys.argv[2]
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: apply_model sees its model


def lora_bytes(model) -> int:
    import torch

    seen, total = set(), 0
    for module in model.modules():
        for attr, value in vars(module).items():
            if "lora" not in attr:
                continue
            for t in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    total += t.untyped_storage().nbytes()
    return total


def main() -> None:
    from vllm import LLM

    kwargs = dict(
        model=sys.argv[1],
        dtype=sys.argv[3],
        max_model_len=int(sys.argv[4]),
        enforce_eager=True,
        skip_tokenizer_init=True,
    )
    if len(sys.argv) > 5:
        kwargs.update(enable_lora=True, max_loras=int(sys.argv[5]), max_lora_rank=int(sys.argv[6]))
    llm = LLM(**kwargs)
    result = {}
    if len(sys.argv) > 5:
        result["lora_bytes"] = llm.apply_model(lora_bytes)[0]
    print("PROBE " + json.dumps(result), flush=True)
    os._exit(0)  # skip vLLM's slow teardown


if __name__ == "__main__":
    main()
