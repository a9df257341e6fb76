"""The ``x86shadow`` command's entry point (console script and ``python -m x86shadow``).

Importing the command pulls in Unicorn, capstone, keystone and rich, which takes a noticeable
moment; a Ctrl-C in that moment must end the command like one during a run (``x86shadow:
interrupted``, status 130), not with a traceback from inside an import. So this module imports
nothing heavy itself and loads the command under the same guard ``cli.main`` keeps for the rest.
"""
import sys

EXIT_INTERRUPTED = 130


def main(argv=None) -> int:
    try:
        from .cli import main as command
    except KeyboardInterrupt:
        sys.stderr.write("x86shadow: interrupted\n")
        return EXIT_INTERRUPTED
    return command(argv)


if __name__ == "__main__":
    sys.exit(main())
