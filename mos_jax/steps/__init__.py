"""Pure step functions (nothing here jits a step): the train state and optimizer (`state`), the
SFT train and dev-loss steps (`sft`), the reward and signal forwards (`reward`), and the theta_0
NLL cache (`reference_cache`). `mos_jax.training.run` jits them once with shardings."""
