"""Print the config reference table, or refresh it in docs/config-reference.md.

    python -m mos_jax.config_doc            # print the table
    python -m mos_jax.config_doc --write    # refresh docs/config-reference.md (between the markers)
"""

import sys

from mos_jax.config import reference_table

USAGE = __doc__


def main(argv) -> int:
  if argv in (['--help'], ['-h'], ['--helpfull']):
    print(USAGE)
  elif argv == ['--write']:
    reference_table.write()
  elif not argv:
    print(reference_table.reference_table())
  else:
    print(f'config_doc: unknown arguments {argv}\n{USAGE}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
