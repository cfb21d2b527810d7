"""Evaluation: lm-eval, paper and skills tasks (`tasks`), the hook the training loop calls
(`during_training`), the lm-eval model, MT-bench and the skills' exact match."""
