"""Using a trained model: loading a run (`loaded`), the KV-cache sampler (`sampler`), chat and
prompt files (`chat`) and Hugging Face export (`export`)."""
