"""lm-eval's own command line with the `mos_jax` model registered.

  python -m mos_jax.lm_eval_cli run --model mos_jax \
      --model_args config=configs/demo.py workdir=runs/demo --tasks arc_easy --limit 20

lm-eval 0.4.13 finds models only among its own modules (its registry has no plugin entry points),
so a bare `lm_eval --model mos_jax` cannot see ours; this command is `lm_eval` with it imported.
Every lm_eval flag and subcommand works unchanged.
"""

import sys


def main() -> None:
  # Imported here, not at the top: jax and lm-eval load only when the command runs.
  from lm_eval import __main__ as lm_eval_main
  from mos_jax.evals import lm_eval_model  # pylint: disable=unused-import  # Registers 'mos_jax'.
  sys.argv[0] = 'lm_eval'
  lm_eval_main.cli_evaluate()


if __name__ == '__main__':
  main()
