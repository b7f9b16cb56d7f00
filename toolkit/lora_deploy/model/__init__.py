"""Facts about checkpoints and adapters, read from headers and configs; no torch at import.

- :mod:`.adapter`: a PEFT adapter's typed settings and tensor index, which PEFT initialisations rewrite the base;
- :mod:`.layout`: a base's architecture as its checkpoint names it (tying, expected keys, the meta-device model);
- :mod:`.shards`: safetensors headers, streaming reads and writes, the one table of dtype names and sizes;
- :mod:`.quantization`: what a checkpoint's ``quantization_config`` is;
- :mod:`.fit`: whether an adapter's tensors fit a base's.

Every feature package (merge, serve, plan, k8s) reads models through here and nowhere else.
"""
