"""One exception type for bad user input.

Anything a user can get wrong (a bad flag, a corrupt file, an unknown metric) raises
`FastFVAEError` with a one-line message naming the problem and what was expected. The CLI
prints it as ``fastfvae: error: <message>`` and exits with code 2, without a traceback.
"""


class FastFVAEError(ValueError):
    """Bad input: the message is one line, naming the problem and what was expected."""
