"""Errors a user can act on: commands print them as one paragraph, without a traceback.

`UserError` is for refusals the program makes on purpose (a held lock, an unreadable checkpoint,
a stopped run). ValueError and OSError (bad config values, bad data, missing files) are treated
the same way by `mos_jax.cli.run`; every other exception keeps its traceback.
"""


class UserError(Exception):
  """A refusal or stop with a message that says what to do."""


EXPECTED = (UserError, ValueError, OSError)
