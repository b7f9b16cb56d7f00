# The publish Job's image (deploy spec adapterStore.publishImage): the vLLM image the servers run, plus lora-deploy,
# so `lora-deploy adapters publish` checks adapters against the installed vLLM's own rules in the cluster.
#   docker build -t registry.example.com/lora-deploy:0.1.0 . && docker push registry.example.com/lora-deploy:0.1.0
FROM vllm/vllm-openai:v0.32.0
COPY pyproject.toml README.md /src/lora-deploy/
COPY toolkit /src/lora-deploy/toolkit
RUN pip install --no-cache-dir /src/lora-deploy && lora-deploy --version
USER 2000
ENTRYPOINT []
