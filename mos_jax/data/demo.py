"""Write the four demo skills and their tokenizer into a folder (made locally, nothing downloaded).

    python -m mos_jax.data.demo --out /tmp/mos_demo
"""

from absl import flags

from mos_jax.data import demo_skills
from mos_jax.infra import cli

_OUT = flags.DEFINE_string('out', None, 'Folder to write the demo skills and tokenizer into.')


def main(argv):
  del argv
  for name, path in demo_skills.ensure_demo(_OUT.value).items():
    skill = demo_skills.SKILLS[name]
    print(f'{name:6s} {skill.format:16s} {skill.size:5d} examples  {path}')
  print(f'tokenizer {demo_skills.tokenizer_dir(_OUT.value)}')


if __name__ == '__main__':
  cli.run(main, 'data.demo', required=('out',))
